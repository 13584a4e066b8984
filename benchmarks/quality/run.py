"""Running a part through `opt-deus compare`: the corpora as data files, then per budget one
CompareSpec (base, variants as recipes, data, training options, seeds) handed to compare's own
`run_comparison` and `write_report` (opt_deus_cli.compare), in compare's layout under
RESULTS/<model>/<domain>/<train>-<steps>/: comparison.json, runs/VARIANT/seedS.json, report.md,
report.json, curves.png, step-time.png. With two workers, two processes run one seed each side by
side on a comparison (compare shares its directory between them: each recipe built once, runs
saved one file each); an interrupted part resumes where it stopped."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from . import data
from .study import MODELS, REPO, Budget, Comparison, Part, Variant, reference_of, train_options


@dataclass(frozen=True)
class Places:
    """Where a study keeps things: results (the comparisons, committed) and work (data files;
    git-ignored)."""

    results: Path = REPO / "benchmarks" / "results" / "quality"
    work: Path = REPO / "bench-out" / "quality"
    max_corpus_bytes: int = data.T.DEFAULT_MAX_BYTES
    eval_tokens: int | None = None  # None: the model's own sample size


def corpus_files(model: str, domain: str, places: Places) -> tuple[Path, Path]:
    """The regime's train.jsonl and eval.jsonl (written once, deterministic)."""
    m = MODELS[model]
    out = places.work / "data" / model / domain
    data.prepare(domain, m.dir, out, places.eval_tokens or m.eval_tokens, places.max_corpus_bytes)
    return out / "train.jsonl", out / "eval.jsonl"


def compare_spec(comparison: Comparison, places: Places, seeds: tuple[int, ...] | None = None):
    """The CompareSpec of a comparison (of some of its seeds)."""
    from opt_deus_cli.checkpoint import read_config
    from opt_deus_cli.compare import CompareSpec
    from opt_deus_cli.recipe import parse_recipe

    budget = comparison.budget
    m = MODELS[budget.model]
    depth = read_config(m.dir)["num_hidden_layers"]
    train, heldout = corpus_files(budget.model, budget.domain, places)
    return CompareSpec(
        base=m.dir,
        recipes={v: parse_recipe(Variant.parse(v).recipe(m, depth), v) for v in comparison.variants},
        data=(train,),
        options=train_options(budget, heldout),
        seeds=seeds or comparison.seeds,
        reference=comparison.reference,
        upscale_device="cpu",
    )


def run_seed(comparison: Comparison, places: Places, seed: int) -> dict:
    """One seed of a comparison, in this process (one torch thread: two run side by side)."""
    import torch

    from opt_deus_cli.compare import run_comparison

    torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = places.results / comparison.budget.name
    name = f"{comparison.budget.name} seed {seed}"
    return run_comparison(compare_spec(comparison, places, (seed,)), out, say=lambda line: print(f"[{name}] {line}"))


def run_part(part: Part, places: Places, workers: int) -> None:
    """Every run of the part not saved yet, seed-major (a slowdown of the shared machine spreads
    over all variants alike), then the reports of its comparisons."""
    for c in part.comparisons:
        corpus_files(c.budget.model, c.budget.domain, places)  # once, before workers read them
    jobs = [(c, seed) for seed in sorted({s for c in part.comparisons for s in c.seeds}) for c in part.comparisons]
    jobs = [(c, seed) for c, seed in jobs if seed in c.seeds]
    started = time.perf_counter()
    failed = 0
    if workers <= 1:
        for c, seed in jobs:
            failed += len(run_seed(c, places, seed)["failed"])
    else:
        # spawn: a clean interpreter per worker (no forked torch thread pools)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_seed, c, places, seed) for c, seed in jobs]):
                failed += len(future.result()["failed"])
    print(f"part {part.name}: done in {(time.perf_counter() - started) / 60:.1f} min, {failed} run(s) failed")
    for budget in dict.fromkeys(c.budget for c in part.comparisons):
        write_reports(places.results / budget.name)


def write_reports(out: Path) -> dict:
    """compare's report of one comparison directory, against copy where it has it."""
    import json

    from opt_deus_cli.compare import write_report

    recipes = json.loads((out / "comparison.json").read_text())["recipes"]
    return write_report(out, reference_of(recipes))


def comparison_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("*/*/*/comparison.json"))


def saved_runs(part: Part, places: Places) -> int:
    return sum((places.results / name / "runs" / v / f"seed{s}.json").is_file() for name, v, s in part.runs)


def quick_part() -> Part:
    """A smoke run: a few arms, 4 steps, one seed, both domains."""
    arms = ("copy", "upper-copy", "opt-deus-exact", "opt-deus-exact-alpha1", "average")
    budgets = [Budget("tiny-llama", d, 4) for d in ("in-domain", "new-domain")]
    return Part("quick", "smoke run", tuple(Comparison(b, arms, (0,)) for b in budgets), workers=1)
