"""Where the overlapped OpT-DeUS layer pays: one corrected/exact layer built with the MLP's
assignment solved in a forked child beside attention (overlapped), in process after it (in
order), and in order on one thread, across MLP widths n. The fork, its copy-on-write pages and attention on one core less
are a fixed cost; the overlap saves min(attention, assignment). methods/opt_deus/corrected.py's
OVERLAP_MIN_NEURONS is the smallest n where overlap was faster, measured here.

Blocks are random bf16 LLaMA blocks (hidden = n / 4, head_dim 64, 4 query heads per KV head);
`--related` makes the upper block a permuted, noisy copy of the lower (real adjacent layers are
closer to this; LAPJV is faster on them, so the crossover moves up). Builds alternate between
the ways, round by round, and the medians are compared; a third way is in order on one thread
(what a layer below the threshold gets).

    python -m benchmarks.overlap_crossover [--sizes 512 1024 2048 4096 8192] [--rounds 5] [--related] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def blocks(n: int, related: bool, seed: int = 0):
    import torch

    from opt_deus_cli.architectures import PROJECTION_ROLES, SUPPORTED, HeadLayout
    from opt_deus_cli.methods.base import BuildContext

    arch = SUPPORTED["llama"]
    hidden = max(128, n // 4)
    heads = max(2, hidden // 64)
    layout = HeadLayout(hidden=hidden, num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=64, intermediate=n)
    g = torch.Generator().manual_seed(seed)

    def block():
        out = {arch.weight(r): 0.02 * torch.randn(layout.weight_shape(r), generator=g) for r in PROJECTION_ROLES}
        out.update({name: 1 + 0.1 * torch.randn(hidden, generator=g) for name in arch.norms})
        return out

    lower = block()
    if related:  # the upper layer: the lower one's neurons shuffled, plus noise of the same size
        perm = torch.randperm(n, generator=g)
        upper = {}
        for name, t in lower.items():
            moved = t
            if name == arch.weight("gate") or name == arch.weight("up"):
                moved = t[perm]
            elif name == arch.weight("down"):
                moved = t[:, perm]
            upper[name] = moved + 0.02 * torch.randn(t.shape, generator=g)
    else:
        upper = block()
    bf16 = lambda b: {k: v.bfloat16() for k, v in b.items()}  # noqa: E731  (as checkpoints store them)
    return bf16(lower), bf16(upper), BuildContext(arch.canonical(), layout, torch.device("cpu"), (0, 1))


# way -> (OVERLAP_MIN_NEURONS for the build, the method's overlap): the size rule set aside
WAYS = {"overlapped": (0, True), "in order": (0, False), "in order, one thread": (1 << 62, False)}


def build_seconds(lower, upper, ctx, way: str) -> float:
    from opt_deus_cli.methods.opt_deus import OptDeusMethod, corrected

    threshold, overlap = WAYS[way]
    chosen, corrected.OVERLAP_MIN_NEURONS = corrected.OVERLAP_MIN_NEURONS, threshold
    try:
        method = OptDeusMethod()
        method.overlap = overlap
        start = time.perf_counter()
        method.build(lower, upper, ctx)
        return time.perf_counter() - start
    finally:
        corrected.OVERLAP_MIN_NEURONS = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536, 2048, 3072, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--related", action="store_true", help="upper = permuted lower + noise (else independent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from opt_deus_cli.methods.opt_deus.corrected import OVERLAP_MIN_NEURONS

    threads = torch.get_num_threads()
    load = [os.getloadavg()[0]]
    rows = []
    for n in args.sizes:
        lower, upper, ctx = blocks(n, args.related)
        build_seconds(lower, upper, ctx, "in order")  # warm-up: first-call imports and allocations
        times = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                times[way].append(build_seconds(lower, upper, ctx, way))
        medians = {way: round(statistics.median(t), 4) for way, t in times.items()}
        rows.append(
            {
                "neurons": n,
                "hidden": ctx.layout.hidden,
                "median_s": medians,
                "fastest": min(medians, key=medians.get),
                "runs": {way: [round(x, 4) for x in t] for way, t in times.items()},
            }
        )
        print(f"n={n}: {medians}", flush=True, file=sys.stderr)
    load.append(os.getloadavg()[0])
    paying = [r["neurons"] for r in rows if r["fastest"] == "overlapped"]
    result = {
        "related": args.related,
        "rounds": args.rounds,
        "load_avg": load,
        "rows": rows,
        "torch_threads": threads,
        "smallest_where_overlap_is_fastest": min(paying) if paying else None,
        "current_threshold": OVERLAP_MIN_NEURONS,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"load {load[0]:.2f} -> {load[1]:.2f}; {'related' if args.related else 'independent'} layers; torch threads "
        f"{threads}; OVERLAP_MIN_NEURONS = {OVERLAP_MIN_NEURONS}"
    )
    print("| MLP neurons | hidden | " + " | ".join(f"{way} s" for way in WAYS) + " | fastest |")
    print("|---|---|" + "---|" * len(WAYS) + "---|")
    for r in rows:
        print(
            f"| {r['neurons']} | {r['hidden']} | "
            + " | ".join(str(r["median_s"][w]) for w in WAYS)
            + f" | {r['fastest']} |"
        )


if __name__ == "__main__":
    main()
