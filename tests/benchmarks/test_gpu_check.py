"""benchmarks/gpu_check.sh, the CPU side: its dry run lists every run the first GPU must make,
and without CUDA it stops at once with one line (exit 1) and writes nothing."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_dry_run_lists_every_run_and_runs_nothing(tmp_path):
    work = tmp_path / "work"
    done = run_script("--dry-run", "--work", str(work))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("pytest -q tests/test_gpu.py" in line for line in lines)
    runs = [line for line in lines if "benchmarks.eight_b" in line]
    for shapes in ("1b", "8b"):
        for solver in ("exact", "sinkhorn"):
            assert any(
                f"--shapes {shapes}" in r and f"--solver {solver}" in r and "--device cuda" in r for r in runs
            ), (shapes, solver)
    assert all("--count 4" in r for r in runs if "--shapes 8b" in r)  # sized for the 8-minute budget
    assert any(
        "benchmarks.train_step" in line and "--device cuda" in line and "--dtype bfloat16" in line for line in lines
    )
    assert not work.exists()


def test_dry_run_can_leave_out_the_8b_runs(tmp_path):
    done = run_script("--dry-run", "--skip-8b", "--work", str(tmp_path / "work"))
    assert done.returncode == 0 and "--shapes 8b" not in done.stdout and "--shapes 1b" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_without_cuda_it_fails_fast_with_one_line(tmp_path):
    work = tmp_path / "work"
    done = run_script("--work", str(work))
    assert done.returncode == 1
    assert done.stderr.startswith("error: no CUDA here") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == "" and not work.exists()
