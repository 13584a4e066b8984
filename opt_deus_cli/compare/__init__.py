"""`opt-deus compare`: which recipe trains best on this model, data and budget (issue 22).

spec    CompareSpec (base, recipes, data, training options, seeds, tasks, launcher), the checks
        made before any work, the settings kept in DIR/comparison.json (a re-run must match)
runner  up-scale each recipe once, train every run not yet saved (here or under a launcher),
        one JSON per run the moment it ends
tasks   the adapter to `opt-deus eval` (lm-evaluation-harness) for --tasks
stats   spreads over seeds, paired differences and sign agreement
report  report.json and report.md: tables, paired differences, step time, the recommendation
plot    curves.png and step-time.png (matplotlib, imported on first use)

from opt_deus_cli.compare import CompareSpec, run_comparison, write_report
"""

from __future__ import annotations

from .spec import CompareSpec, with_evaluation, with_train_fields

__all__ = ["CompareSpec", "run_comparison", "with_evaluation", "with_train_fields", "write_report"]


def __getattr__(name: str):
    if name == "run_comparison":
        from .runner import run_comparison

        return run_comparison
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(name)
