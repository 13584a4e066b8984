"""One-off migration of the study's runs measured on 2026-11-25 by the pre-compare runner
(benchmarks/quality/runner.py of commit 876c98e, removed since; layout RESULTS/runs/MODEL/DOMAIN/KIND/VARIANT/seedS.json)
into `opt-deus compare`'s layout, one comparison per budget (RESULTS/MODEL/DOMAIN/KIND/:
comparison.json, runs/VARIANT/seedS.json), so compare's report reads them.

Every value of an old file is kept: the measures in compare's fields (held-out curve, final and
step-0 loss, training curve, step times, sizes, data sha256, versions, load), the rest (the old
spec, settings, corpus, machine) under "migrated", with a note saying when and by what each run
was measured. `original` rebuilds the old file from a migrated one; the migration checks that it
gives back every old file exactly before writing anything, and that the old settings are the ones
study.train_options gives the budget today (the runs are what the new path would compute).

    python -m benchmarks.quality.migrate [RESULTS]     # then: python -m benchmarks.quality report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .study import MODELS, PARTS, REPO, Budget, train_options

NOTE = (
    "measured on 2026-11-25 by the pre-compare runner of benchmarks/quality (runner.py of commit 876c98e, "
    "training through opt_deus_cli.training.train, one JSON per run in "
    "runs/MODEL/DOMAIN/KIND/VARIANT/seedS.json) and migrated to opt-deus compare's layout by "
    "benchmarks/quality/migrate.py on 2026-12-03; every value of the old file is kept (the rest under 'migrated')"
)
# measures copied as they are (compare's run record uses the same names)
MEASURES = (
    "seconds_per_step",
    "train_seconds",
    "wall_seconds",
    "trainable_parameters",
    "total_parameters",
    "tokens",
    "train_blocks",
    "eval_blocks",
    "data_sha256",
    "versions",
    "load_average",
    "finished",
)
KEPT = ("spec", "settings", "corpus", "machine")  # what compare's record has no field for
# the old runner recorded no hash of the base; examples/tiny-llama is in git, unchanged since
# b38fb30 (2026-11-23), so hashing it now gives what the runs used. SmolLM2 was rebuilt since.
BASE_UNCHANGED = {
    "tiny-llama": "hashed at migration: examples/tiny-llama is unchanged in git since b38fb30 (2026-11-23)"
}


def migrate_run(old: dict, source: str) -> dict:
    evals = [[step, loss] for step, loss in zip(old["eval_steps"], old["eval_loss"])]
    return {
        "recipe": old["spec"]["variant"],
        "seed": old["spec"]["seed"],
        "status": "ok",
        "model": old["variant"],
        "start": {"eval_loss": evals[0][1]} if evals and evals[0][0] == 0 else {},
        "metrics": {"eval_loss": evals[-1][1]} if evals else {},  # the last eval: at the final step
        "higher_is_better": {"eval_loss": False},
        "curves": {"train_loss": old["train_loss"], "eval_loss": evals},
        **{k: old[k] for k in MEASURES},
        "launcher": None,
        "log": None,
        "migrated": {"note": NOTE, "from": source, **{k: old[k] for k in KEPT}},
    }


def original(run: dict) -> dict:
    """The pre-compare file a migrated run came from."""
    m = run["migrated"]
    curve = run["curves"]["eval_loss"]
    return {
        "spec": m["spec"],
        "settings": m["settings"],
        "variant": run["model"],
        "corpus": m["corpus"],
        "eval_steps": [step for step, _ in curve],
        "eval_loss": [loss for _, loss in curve],
        "train_loss": run["curves"]["train_loss"],
        **{k: run[k] for k in MEASURES},
        "machine": m["machine"],
    }


def budget_of(old: dict) -> Budget:
    s = old["spec"]
    return Budget(s["model"], s["domain"], s["steps"], s["train"], s["evaluate"])


def check_settings(old: dict, budget: Budget) -> None:
    """The old run's settings are what train_options gives its budget today."""
    o = train_options(budget, Path("eval.jsonl"))
    a, s = o.trainer_args, old["settings"]
    today = {
        "lr": o.lr,
        "batch_size": o.batch_size,
        "seq_len": o.seq_len,
        "warmup_steps": a["warmup_steps"],
        "schedule": "cosine to 10% of the peak" if a["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1} else None,
        "weight_decay": a["weight_decay"],
        "adam_betas": [a["adam_beta1"], a["adam_beta2"]],
        "max_grad_norm": a["max_grad_norm"],
        "dtype": o.dtype,
        "device": o.device,
        "eval_every": o.eval_every,
    }
    if s != today:
        raise SystemExit(f"{old['spec']}: settings {s} are not today's {today}; not migrated")


def comparison_record(budget: Budget, runs: list[dict]) -> dict:
    """comparison.json of a migrated budget: compare's settings with the recorded data sha256s."""
    from opt_deus_cli.compare.spec import CompareSpec, base_record, settings_record

    first = runs[0]
    corpus = first["migrated"]["corpus"]
    hashes = first["data_sha256"]
    if any(r["data_sha256"] != hashes for r in runs):
        raise SystemExit(f"{budget.name}: runs with different data files; not migrated")
    data = [{"name": Path(corpus["train_file"]).name, "sha256": hashes[0]}]
    eval_data = [{"name": Path(corpus["eval_file"]).name, "sha256": hashes[1]}] if budget.evaluate else []
    base_dir = MODELS[budget.model].dir
    if budget.model in BASE_UNCHANGED:
        base = {**base_record(base_dir), "note": BASE_UNCHANGED[budget.model]}
    else:
        base = {"config_sha256": None, "weights": None, "note": "not recorded by the 2026-11-25 runner"}
    options = train_options(budget, Path(corpus["eval_file"]))  # its path is not a setting
    spec = CompareSpec(base=base_dir, recipes={}, data=(), options=options, seeds=())
    # in the order the study's parts list the variants (the report's row order)
    order = [v for part in PARTS.values() for c in part.comparisons if c.budget == budget for v in c.variants]
    recipes = {}
    for r in sorted(runs, key=lambda r: order.index(r["recipe"])):
        recipes.setdefault(r["recipe"], r["model"]["recipe"])
    return {
        "settings": settings_record(base, data, eval_data, spec),
        "recipes": recipes,
        "seeds": sorted({r["seed"] for r in runs}),
        "migrated": NOTE,
    }


def migrate(results: Path) -> list[Path]:
    """Old runs under results/runs -> compare's layout under results; the old files removed.
    Nothing is written unless every old file migrates and comes back exactly."""
    from opt_deus_cli.compare.spec import write_json_atomic

    old_files = sorted((results / "runs").rglob("seed*.json"))
    if not old_files:
        raise SystemExit(f"no pre-compare runs under {results / 'runs'}")
    budgets: dict[Budget, list[dict]] = {}
    for path in old_files:
        old = json.loads(path.read_text())
        run = migrate_run(old, path.relative_to(results).as_posix())
        if original(run) != old:
            raise SystemExit(f"{path}: the migrated record does not give back the old one; not migrated")
        budget = budget_of(old)
        check_settings(old, budget)
        budgets.setdefault(budget, []).append(run)
    written = []
    for budget, runs in budgets.items():
        out = results / budget.name
        if out.exists():
            raise SystemExit(f"{out} exists; not migrated")
        record = comparison_record(budget, runs)
        out.mkdir(parents=True)
        write_json_atomic(out / "comparison.json", record)
        for run in runs:
            path = out / "runs" / run["recipe"] / f"seed{run['seed']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, run)
            written.append(path)
    for path in old_files:
        path.unlink()
    for directory in sorted((results / "runs").rglob("*"), reverse=True):
        directory.rmdir()
    (results / "runs").rmdir()
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else REPO / "benchmarks" / "results" / "quality"
    written = migrate(results)
    print(f"migrated {len(written)} runs into compare's layout under {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
