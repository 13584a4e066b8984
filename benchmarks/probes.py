"""Small measurements behind statements in BENCHMARKS.md, each a few seconds to a minute:

lap-reduction   LAPJV on an unrelated 1B-shape MLP cost as computed, and minus its row minima,
                its column minima, both (same optimum; the solver subtracts both since 980b816)
memory-stages   RSS at the stages of one OpT-DeUS layer built in order (attention, then the MLP),
                independent random layers: the peak of the layer alone, without the CLI around it
null-alignment  how much exact alignment lowers SmolLM2's adjacent MLP costs, next to what it
                finds between a real layer and a Gaussian layer of the upper one's scale

  python -m benchmarks.probes lap-reduction [--shapes 1b] [--rounds 2]
  python -m benchmarks.probes memory-stages [--shapes 1b|8b]
  python -m benchmarks.probes null-alignment      # needs `make bench-model`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.one_layer import SHAPES, _blocks
from opt_deus_cli import ot, solvers
from opt_deus_cli.architectures import SUPPORTED, HeadLayout
from opt_deus_cli.methods.opt_deus.mlp import identity_cost, matched_cost, mlp_features, mlp_paths

SMOLLM2 = Path(__file__).resolve().parent.parent / "bench-out" / "models" / "smollm2-135m-instruct"
LLAMA = SUPPORTED["llama"]


def _cost(lower: dict, upper: dict) -> tuple[np.ndarray, list, list]:
    fa, fb = mlp_features(lower, mlp_paths(LLAMA)), mlp_features(upper, mlp_paths(LLAMA))
    n = fa[0].shape[0]
    cost = ot.cost_matrix_blocks(fa, fb, "sqeuclidean", out=torch.empty((n, n), dtype=torch.float64))
    return cost.numpy(), fa, fb


def lap_reduction(shapes: str, rounds: int) -> None:
    cost, _, _ = _cost(*_blocks(HeadLayout(**SHAPES[shapes]), 0.5, True, 0))
    variants = {
        "as computed": lambda c: c,
        "minus row minima": lambda c: c - c.min(1, keepdims=True),
        "minus column minima": lambda c: c - c.min(0, keepdims=True),
        "minus rows, then columns": lambda c: (lambda d: d - d.min(0, keepdims=True))(c - c.min(1, keepdims=True)),
    }
    first = None
    for r in range(rounds):  # interleaved: the machine's load drifts
        for name, f in variants.items():
            c = np.ascontiguousarray(f(cost))
            start = time.perf_counter()
            col = solvers._lap(c)
            first = col if first is None else first
            print(
                f"{shapes} round {r} {name:26} LAPJV {time.perf_counter() - start:6.2f} s, same optimum: {np.array_equal(col, first)}",
                flush=True,
            )


def memory_stages(shapes: str) -> None:
    from opt_deus_cli.methods.base import BuildContext, Decisions
    from opt_deus_cli.methods.opt_deus import corrected
    from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings

    def rss() -> str:
        status = Path("/proc/self/status").read_text()
        now, peak = (int(status.split(k)[1].split()[0]) // 1024 for k in ("VmRSS:", "VmHWM:"))
        return f"RSS {now} MB, peak {peak} MB"

    layout = HeadLayout(**SHAPES[shapes])
    lower, upper = _blocks(layout, 0.5, True, 0)
    print(f"{shapes}: two source blocks read: {rss()}", flush=True)
    for name in ("align_attention", "fuse_attention", "align_mlp", "fuse_mlp", "average_rest"):

        def traced(*a, _f=getattr(corrected, name), _name=name, **k):
            out = _f(*a, **k)
            print(f"after {_name}: {rss()}", flush=True)
            return out

        setattr(corrected, name, traced)
    ctx = BuildContext(LLAMA.canonical(), layout, torch.device("cpu"), (0, 1), None, Decisions(overlap=False))
    corrected.build_corrected(lower, upper, ctx, AlignmentSettings(), 0.5)


def null_alignment(pairs: list[int]) -> None:
    from safetensors import safe_open

    files = sorted(SMOLLM2.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no checkpoint in {SMOLLM2}: run `make bench-model` first")

    def mlp(k: int) -> dict:
        prefix, out = f"model.layers.{k}.mlp.", {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                out.update(
                    {"mlp." + name[len(prefix) :]: h.get_tensor(name) for name in h.keys() if name.startswith(prefix)}
                )
        return out

    def gain(a: dict, b: dict) -> float:
        cost, fa, fb = _cost(a, b)
        col = torch.from_numpy(solvers._lap(cost))
        cpu = torch.device("cpu")
        return 1 - float(matched_cost(fa, fb, col, "sqeuclidean", cpu).mean()) / float(
            identity_cost(fa, fb, "sqeuclidean", cpu).mean()
        )

    g = torch.Generator().manual_seed(0)
    for k in pairs:
        a, b = mlp(k), mlp(k + 1)
        noise = {
            n: (torch.randn(t.shape, generator=g) * t.float().std() + t.float().mean()).to(t.dtype)
            for n, t in b.items()
        }
        print(
            f"pair {k}-{k + 1}: real {100 * gain(a, b):.1f}%, against a Gaussian layer of the upper one's scale {100 * gain(a, noise):.1f}%",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes", description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("lap-reduction", "memory-stages", "null-alignment"))
    p.add_argument("--shapes", choices=tuple(SHAPES), default="1b")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 14, 20, 27])
    args = p.parse_args()
    if args.probe == "lap-reduction":
        lap_reduction(args.shapes, args.rounds)
    elif args.probe == "memory-stages":
        memory_stages(args.shapes)
    else:
        null_alignment(args.pairs)


if __name__ == "__main__":
    main()
