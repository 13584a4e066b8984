"""Wall time and peak RSS of building ONE OpT-DeUS layer from two random bf16 blocks, per case:

    corrected-exact     mode corrected, solver exact (the default)
    corrected-sinkhorn  mode corrected, solver sinkhorn (epsilon 0.05)
    reference           the published semantics (POT Sinkhorn-Knopp, reg 0.06, up to 10000 iterations)

Shapes: 1b = LLaMA-3.2-1B (hidden 2048, intermediate 8192, 32 heads, 8 KV heads, head_dim 64),
8b = LLaMA-3.1-8B (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, head_dim 128).
The upper block is an allowed permutation of the lower one (KV groups, heads, value dims, MLP
neurons) plus Gaussian noise (--noise, relative to the weights' std), so the plans have
something to find; --independent draws the upper block independently instead (the hardest case
for the exact solver).

Each case runs in its own child process (this parent imports no torch), so the peak RSS
(getrusage ru_maxrss of the child, which includes the two source blocks and the interpreter)
is per case. --max-iter N builds the layer twice, with the Sinkhorn iterations capped at N and
at 2N; the time of every plan (reference) or group (corrected) that ran into both caps is then
extrapolated linearly from 2N to the full budget (2000 corrected, 10000 reference) and the row
is marked "extrapolated"; the other figures are those of the 2N build.

    python -m benchmarks.one_layer --shapes 1b
    python -m benchmarks.one_layer --shapes 8b --cases corrected-exact
    python -m benchmarks.one_layer --shapes 8b --cases reference --max-iter 50 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "1b": dict(hidden=2048, num_heads=32, num_kv_heads=8, head_dim=64, intermediate=8192),
    "8b": dict(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336),
}
CASES = ("corrected-exact", "corrected-sinkhorn", "reference")


def _blocks(layout, noise: float, independent: bool, seed: int, with_moves: bool = False):
    """(lower, upper) LLaMA blocks in bf16; upper = allowed permutation of lower + noise
    (with_moves: and the permutation, role -> (dim, index), None when independent)."""
    import torch

    from opt_deus_cli.architectures import PROJECTION_ROLES, SUPPORTED

    arch = SUPPORTED["llama"]
    g = torch.Generator().manual_seed(seed)
    std = 0.02

    def rand(shape):  # generated row chunk by row chunk: no full-size float32 temporary
        out = torch.empty(shape, dtype=torch.bfloat16)
        for i in range(0, shape[0], 1024):
            out[i : i + 1024] = std * torch.randn((min(1024, shape[0] - i),) + tuple(shape[1:]), generator=g)
        return out

    lower = {arch.weight(r): rand(layout.weight_shape(r)) for r in PROJECTION_ROLES}
    lower.update({n: (1 + 0.1 * torch.randn(layout.hidden, generator=g)).bfloat16() for n in arch.norms})
    if independent:
        upper = {n: rand(t.shape) if t.dim() == 2 else t.clone() for n, t in lower.items()}
        return (lower, upper, None) if with_moves else (lower, upper)
    moves = layout.random_allowed_permutation(g)
    upper = {n: t.clone() for n, t in lower.items()}
    for role, (dim, index) in moves.items():
        name = arch.weight(role)
        t = lower[name].index_select(dim, index)
        for i in range(0, t.shape[0], 1024):  # + noise, in chunks
            chunk = t[i : i + 1024].float()
            t[i : i + 1024] = chunk + noise * std * torch.randn(chunk.shape, generator=g)
        upper[name] = t
    return (lower, upper, moves) if with_moves else (lower, upper)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(case: str, shapes: str, noise: float, independent: bool, max_iter: int | None, seed: int) -> dict:
    import resource
    import time
    import warnings

    import torch

    from opt_deus_cli.architectures import SUPPORTED, HeadLayout
    from opt_deus_cli.methods.base import BuildContext
    from opt_deus_cli.methods.opt_deus import OptDeusMethod
    from opt_deus_cli.methods.opt_deus.settings import PUBLISHED, AlignmentSettings, ReferenceSolver

    layout = HeadLayout(**SHAPES[shapes])
    lower, upper = _blocks(layout, noise, independent, seed)
    rss_blocks = _rss_mb()
    ctx = BuildContext(SUPPORTED["llama"], layout, torch.device("cpu"))

    def build(cap: int | None):
        """One timed build with the Sinkhorn iterations capped at `cap` (None: the full budget)."""
        if case == "reference":
            method = OptDeusMethod(
                AlignmentSettings(mode="reference"), reference_solver=ReferenceSolver(max_iter=cap or full_iter)
            )
        else:
            method = OptDeusMethod(AlignmentSettings(solver=case.split("-", 1)[1], max_iter=cap or full_iter))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = method.build(lower, upper, ctx)
        return time.perf_counter() - start, report

    def timings(report) -> dict:
        """Separately timed units: each plan (reference) or each group (corrected)."""
        if case == "reference":
            return {
                n: (f["iterations"], f["seconds"]) for g in ("attention", "mlp") for n, f in report[g]["plans"].items()
            }
        return {g: (report[g]["iterations"], report[g]["seconds"]) for g in ("attention", "mlp")}

    full_iter = PUBLISHED.max_iter if case == "reference" else AlignmentSettings().max_iter
    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()
    extra, capped = 0.0, []
    if max_iter and 2 * max_iter < full_iter:
        # Two capped builds, N and 2N iterations: a unit that ran into both caps costs
        # fixed + slope * iterations; extrapolate it from 2N to the full budget.
        _, report_1 = build(max_iter)
        seconds, report = build(2 * max_iter)
        runs = 2
        t1, t2 = timings(report_1), timings(report)
        for unit, (it2, s2) in t2.items():
            it1, s1 = t1[unit]
            if it1 >= max_iter and it2 >= 2 * max_iter:
                capped.append(unit)
                extra += max(s2 - s1, 0.0) / max_iter * (full_iter - 2 * max_iter)
    else:
        seconds, report = build(None)
        runs = 1
    cpu_seconds = (time.process_time() - cpu_before) / runs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    summary = {
        g: {
            k: report[g][k]
            for k in (
                "iterations",
                "converged",
                "marginal_error",
                "cost_before",
                "cost_after",
                "permutation_likeness",
                "seconds",
            )
        }
        for g in ("attention", "mlp")
    }
    return {
        "case": case,
        "shapes": shapes,
        "noise": None if independent else noise,
        "seconds": seconds,
        "seconds_full": seconds + extra,
        "extrapolated": bool(capped),
        "capped_plans": capped,
        "max_iter": 2 * max_iter if capped else None,
        "peak_rss_mb": peak,
        "rss_blocks_mb": rss_blocks,
        "threads": torch.get_num_threads(),
        "cpu_seconds": cpu_seconds,
        # other processes compete for the cores: 1-minute load average before and after the build
        "load_avg": [load_before, os.getloadavg()[0]],
        "report": summary,
    }


def run_case(args, case: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        case,
        "--shapes",
        args.shapes,
        "--noise",
        str(args.noise),
        "--seed",
        str(args.seed),
    ]
    if args.independent:
        cmd.append("--independent")
    if args.max_iter:
        cmd += ["--max-iter", str(args.max_iter)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"case {case} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (
        f"{'case':<20}{'shapes':>7}{'seconds':>10}{'full run s':>12}{'cpu s':>8}{'load':>10}{'peak RSS MB':>13}"
        f"{'blocks MB':>11}  attention / mlp"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        full = f"{r['seconds_full']:.1f}" + ("*" if r["extrapolated"] else "")
        figs = " / ".join(
            f"{r['report'][g]['iterations']} it, conv {r['report'][g]['converged']}, "
            f"cost {r['report'][g]['cost_before']:.3g}->{r['report'][g]['cost_after']:.3g}, "
            f"perm {r['report'][g]['permutation_likeness']:.2f}, {r['report'][g]['seconds']:.1f}s"
            for g in ("attention", "mlp")
        )
        load = "{:.1f}/{:.1f}".format(*r["load_avg"])
        lines.append(
            f"{r['case']:<20}{r['shapes']:>7}{r['seconds']:>10.1f}{full:>12}{r['cpu_seconds']:>8.0f}{load:>10}"
            f"{r['peak_rss_mb']:>13.0f}{r['rss_blocks_mb']:>11.0f}  {figs}"
        )
    if any(r["extrapolated"] for r in rows):
        lines.append("* extrapolated: Sinkhorn time of plans that hit --max-iter scaled linearly to the full budget")
    lines.append("load: 1-minute load average before/after the build (2 cores: above 2 means other processes competed)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--noise", type=float, default=0.5, help="noise std relative to the weights' std (default 0.5)")
    p.add_argument("--independent", action="store_true", help="upper block independent of the lower one")
    p.add_argument("--max-iter", type=int, default=None, help="cap Sinkhorn iterations and extrapolate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shapes, args.noise, args.independent, args.max_iter, args.seed)))
        return
    rows = []
    for case in args.cases:
        rows.append(run_case(args, case))
        print(
            f"{case}: {rows[-1]['seconds']:.1f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        print(
            json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}, indent=1)
        )
    else:
        print()
        print(table(rows))


if __name__ == "__main__":
    main()
