"""Command line of the quality study; see benchmarks/quality/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .study import PARTS, REPO


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("command", nargs="?", default="list", choices=("list", "run", "report"))
    p.add_argument("parts", nargs="*", help=f"parts to run: {', '.join(PARTS)}")
    p.add_argument("--workers", type=int, help="runs at once (default: the part's own, 2 or 1)")
    p.add_argument("--results", type=Path, help="the comparisons (default benchmarks/results/quality)")
    p.add_argument("--work", type=Path, help="data files (default bench-out/quality)")
    p.add_argument("--quick", action="store_true", help="smoke run: small corpus, 4 steps, a few arms, one seed")
    args = p.parse_args(argv)
    unknown = [name for name in args.parts if name not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.command == "run" and not args.parts and not args.quick:
        p.error("name the part(s) to run (see `list`), or --quick")
    return args


def places(args):
    from .run import Places

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


def report(results: Path) -> None:
    """compare's report of every comparison under `results`, and the tables across them."""
    from .run import comparison_dirs, write_reports
    from .summary import markdown

    for out in comparison_dirs(results):
        write_reports(out)
    (results / "summary.md").write_text(markdown(results))
    print(f"wrote the reports of {len(comparison_dirs(results))} comparison(s) and {results / 'summary.md'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    where = places(args)
    if args.command == "list":
        from .run import saved_runs

        for part in PARTS.values():
            print(
                f"{part.name:14} {saved_runs(part, where):3}/{len(part.runs):<3} runs saved, "
                f"{part.workers} worker(s): {part.description}"
            )
        return 0
    if args.command == "run":
        from .run import quick_part, run_part

        for part in [quick_part()] if args.quick else [PARTS[name] for name in args.parts]:
            print(f"part {part.name}: {part.description}", flush=True)
            run_part(part, where, args.workers or part.workers)
    report(where.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
