"""Installed as users install it: a wheel built from the source, installed outside the source
tree, runs `opt-deus recipes` and `upscale --recipe top-half` from another directory (the shipped
recipes are package data, not files of the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as a wheel installed into a directory of its own (dependencies come from the
    test environment, as pipx or pip would have installed them)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(SOURCE / "opt_deus_cli", src / "opt_deus_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(SOURCE / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (work / "dist").glob("opt_deus_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "opt_deus_cli/recipes/top-half.yaml" in names and "opt_deus_cli/methods/opt_deus/attention.py" in names
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, str(target / "bin" / "opt-deus"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_installed_package_is_the_wheel(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import opt_deus_cli; print(opt_deus_cli.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed), where


def test_recipes_and_upscale_from_another_directory(installed, tmp_path, model_factory):
    listed = run(installed, tmp_path, "recipes", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {"top-half", "llama-pro", "solar"} <= {r["name"] for r in rows}
    assert all(Path(r["path"]).is_relative_to(installed) for r in rows)
    result = run(
        installed,
        tmp_path,
        "upscale",
        str(model_factory("llama")),
        "--recipe",
        "top-half",
        "--out",
        "deeper",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "deeper" / "opt-deus-manifest.json").read_text())
    assert manifest["recipe"]["method"] == "opt-deus" and manifest["new_layers"] == [3, 5, 7]
