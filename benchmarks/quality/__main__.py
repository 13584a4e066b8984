"""Command line of the quality study; see benchmarks/quality/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .study import PARTS, REPO, RunSpec

QUICK_ARMS = ("copy", "upper-copy", "opt-deus-exact", "opt-deus-exact-alpha1", "average")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("command", nargs="?", default="list", choices=("list", "run", "report"))
    p.add_argument("parts", nargs="*", help=f"parts to run: {', '.join(PARTS)}")
    p.add_argument("--workers", type=int, help="runs at once (default: the part's own, 2 or 1)")
    p.add_argument("--results", type=Path, help="per-run JSON, report, figures (default benchmarks/results/quality)")
    p.add_argument("--work", type=Path, help="data files, deeper checkpoints (default bench-out/quality)")
    p.add_argument("--quick", action="store_true", help="smoke run: small corpus, 4 steps, a few arms, one seed")
    args = p.parse_args(argv)
    unknown = [name for name in args.parts if name not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.command == "run" and not args.parts and not args.quick:
        p.error("name the part(s) to run (see `list`), or --quick")
    return args


def places(args):
    from .runner import Places

    if args.quick:
        root = REPO / "bench-out" / "quality-quick"
        return Places(
            results=args.results or root / "results",
            work=args.work or root / "work",
            max_corpus_bytes=300_000,
            eval_tokens=2048,
        )
    default = Places()
    return Places(results=args.results or default.results, work=args.work or default.work)


def report(where) -> None:
    from .plot import figures
    from .report import markdown
    from .stats import load_runs, tables

    found = tables(load_runs(where.results))
    where.results.mkdir(parents=True, exist_ok=True)
    (where.results / "report.md").write_text(markdown(found))
    written = figures(found, where.results)
    print(f"wrote {where.results / 'report.md'} and {', '.join(str(p) for p in written) or 'no figures'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    where = places(args)
    if args.command == "list":
        from .runner import saved

        for part in PARTS.values():
            done = sum(saved(s, where) is not None for s in part.runs)
            print(
                f"{part.name:14} {done:3}/{len(part.runs):<3} runs saved, {part.workers} worker(s): {part.description}"
            )
        return 0
    if args.command == "run":
        from .runner import run_specs

        started = time.perf_counter()
        if args.quick:
            specs = [RunSpec("tiny-llama", d, v, 4, 0) for d in ("in-domain", "new-domain") for v in QUICK_ARMS]
            run_specs(specs, where, args.workers or 1)
        for name in args.parts:
            part = PARTS[name]
            print(f"part {name}: {part.description}", flush=True)
            run_specs(list(part.runs), where, args.workers or part.workers)
        print(f"done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    report(where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
