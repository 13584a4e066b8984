"""The first run on a GPU, in one command (benchmarks/gpu_check.sh runs this): where CUDA exists,
1. tests/test_gpu.py (the cost matrices and Sinkhorn on the GPU agree with the CPU);
2. the 1B-shape top-half run (16 -> 24 layers, 8 new) with --device cuda, exact and Sinkhorn;
3. the 8B-shape run with --device cuda, 4 new layers only (32 -> 36), exact and Sinkhorn: the
   whole script is sized to finish within 8 minutes on one H100/H200-class GPU;
4. an `opt-deus train` step-time probe on CUDA in bf16 (the shipped model's top-half output).
Every figure (wall, CPU, peak RSS, torch's peak CUDA allocation, the GPU's used memory sampled
by nvidia-smi, per-layer seconds) goes to one JSON, with the nvidia-smi facts, and a summary.
Without CUDA it stops at once with one line saying so (exit 1); --dry-run prints what it would
run, and runs nothing.

    benchmarks/gpu_check.sh [--dry-run] [--work bench-out/gpu-check] [--skip-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_SECONDS = 8 * 60  # the whole check on one H100/H200-class GPU
NVIDIA_FACTS = "name,memory.total,driver_version,compute_cap,pci.bus_id,power.limit,clocks.max.sm"


@dataclass
class Step:
    name: str
    argv: list[str]
    json_output: bool = True  # the command prints one JSON document on stdout
    timeout: int = 600
    result: dict = field(default_factory=dict)


def steps(python: str, work: Path, skip_8b: bool) -> list[Step]:
    eight_b = [python, "-m", "benchmarks.eight_b", "--device", "cuda", "--json"]
    planned = [Step("tests/test_gpu.py", [python, "-m", "pytest", "-q", "tests/test_gpu.py"], json_output=False)]
    for solver in ("exact", "sinkhorn"):
        planned.append(
            Step(
                f"1B top-half, {solver}",
                [*eight_b, "--shapes", "1b", "--solver", solver, "--work", str(work / f"1b-{solver}")],
            )
        )
    if not skip_8b:
        for solver in ("exact", "sinkhorn"):  # the 16 GB checkpoint is written once, kept for the second run
            keep = ["--keep"] if solver == "exact" else []
            planned.append(
                Step(
                    f"8B, 4 new layers, {solver}",
                    [*eight_b, "--shapes", "8b", "--count", "4", "--solver", solver, "--work", str(work / "8b"), *keep],
                )
            )
    planned.append(
        Step(
            "train step, cuda bf16",
            [
                python,
                "-m",
                "benchmarks.train_step",
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
                "--steps",
                "12",
                "--repeats",
                "1",
                "--positions",
                "top",
                "--json",
            ],
        )
    )
    return planned


def cuda_facts(python: str) -> dict:
    """What torch sees: CUDA available, devices, versions (in a child: this process stays torch-free)."""
    code = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
        "'cuda_build': torch.version.cuda, 'available': c, 'devices': [torch.cuda.get_device_name(i) "
        "for i in range(torch.cuda.device_count())] if c else []}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"available": False, "error": (done.stderr.strip().splitlines() or ["torch did not start"])[-1]}
    return json.loads(done.stdout)


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={NVIDIA_FACTS}", "--format=csv,noheader"], capture_output=True, text=True
    )
    gpus = [
        dict(zip(NVIDIA_FACTS.split(","), (x.strip() for x in line.split(","))))
        for line in done.stdout.strip().splitlines()
    ]
    version = subprocess.run(["nvidia-smi", "--version"], capture_output=True, text=True).stdout.strip()
    return {"gpus": gpus, "version": version}


class GpuMemorySampler:
    """The GPU's used memory (MiB, the busiest GPU's) sampled by nvidia-smi every 0.25 s while a
    step runs: the whole process tree's, CUDA context and torch's cache included."""

    def __init__(self):
        self.peak = 0
        self._proc = None
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:  # one line per GPU and sample: the peak of the busiest GPU
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()


def run_step(step: Step, log) -> None:
    started = time.perf_counter()
    with GpuMemorySampler() as sampler:
        try:
            done = subprocess.run(step.argv, capture_output=True, text=True, cwd=ROOT, timeout=step.timeout)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code, stdout, stderr = "timeout", e.stdout or "", f"timed out after {step.timeout} s"
    step.result = {
        "command": " ".join(step.argv),
        "exit": code,
        "seconds": round(time.perf_counter() - started, 1),
        "gpu_memory_used_peak_mib": sampler.peak,
    }
    if code == 0 and step.json_output:
        step.result["figures"] = json.loads(stdout)
    elif code != 0:
        step.result["error"] = (stderr or stdout).strip()[-3000:]
    else:
        step.result["output"] = stdout.strip().splitlines()[-1:]
    log(f"{step.name}: exit {code} in {step.result['seconds']} s, GPU memory peak {sampler.peak} MiB")


def summary(report: dict) -> str:
    lines = [
        f"# gpu_check {report['started']}: {report['total_seconds']} s (budget {BUDGET_SECONDS} s)",
        f"GPU: {', '.join(g.get('name', '?') for g in report['nvidia_smi'].get('gpus', []))}; torch {report['cuda']['torch']} "
        f"(CUDA {report['cuda']['cuda_build']})",
        "",
        "| step | exit | s | wall of the command s | per new layer s (min-max) | CLI peak RSS MB | torch peak CUDA MB | GPU used peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["steps"].items():
        f = r.get("figures") or {}
        up = f.get("upscale", {})
        layers = f.get("new_layer_seconds") or []
        per_layer = f"{sum(layers) / len(layers):.2f} ({min(layers):.2f}-{max(layers):.2f})" if layers else ""
        if "rows" in f:  # the train-step probe
            per_layer = "s/step " + ", ".join(f"{row['train']}: {row['seconds_per_step']:.3f}" for row in f["rows"])
        lines.append(
            f"| {name} | {r['exit']} | {r['seconds']} | {up.get('seconds', '')} | {per_layer} | "
            f"{up.get('own_peak_rss_mb', '')} | {up.get('peak_cuda_allocated_mb', '')} | {r['gpu_memory_used_peak_mib']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "gpu-check")
    parser.add_argument("--skip-8b", action="store_true", help="leave out the 8B-shape runs (a GPU under 40 GB)")
    args = parser.parse_args(argv)
    python = sys.executable
    planned = steps(python, args.work, args.skip_8b)
    if args.dry_run:
        print(f"gpu_check would run, from {ROOT} (results in {args.work}/gpu_check.json and summary.md):")
        for step in planned:
            print(f"  {step.name}: {' '.join(step.argv)}")
        return 0
    cuda = cuda_facts(python)
    if not cuda.get("available"):
        why = (
            cuda.get("error") or f"torch {cuda.get('torch')} sees no CUDA device (CUDA build: {cuda.get('cuda_build')})"
        )
        print(
            f"error: no CUDA here: {why}; gpu_check needs a CUDA GPU and a CUDA build of torch "
            "(make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128')",
            file=sys.stderr,
        )
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.perf_counter()
    report = {
        "started": started,
        "cuda": cuda,
        "nvidia_smi": nvidia_smi(),
        "load_avg": [os.getloadavg()[0]],
        "steps": {},
    }
    for step in planned:
        run_step(step, lambda line: print(line, file=sys.stderr, flush=True))
        report["steps"][step.name] = step.result
    report["load_avg"].append(os.getloadavg()[0])
    report["total_seconds"] = round(time.perf_counter() - clock, 1)
    report["within_budget"] = report["total_seconds"] <= BUDGET_SECONDS
    (args.work / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = summary(report)
    (args.work / "summary.md").write_text(text)
    print(text)
    failed = [name for name, r in report["steps"].items() if r["exit"] != 0]
    if failed:
        print(
            f"error: {len(failed)} step(s) failed: {', '.join(failed)}; see {args.work / 'gpu_check.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
