"""The one place `opt-deus compare` calls `opt-deus eval` (lm-evaluation-harness tasks), through
its Python API `opt_deus_cli.evaluation.evaluate`, imported on first use: a comparison without
--tasks never loads lm-eval."""

from __future__ import annotations

import math
from pathlib import Path


def task_scores(model_dir: Path, tasks: tuple[str, ...], options: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """({"task/metric": value}, {"task/metric": higher is better}) for one model: the scores
    lm-eval reported per task, as lm-eval itself tells them apart (see flatten_scores)."""
    from ..evaluation import evaluate

    result = evaluate([str(model_dir)], list(tasks), **options)
    return flatten_scores(result["models"][0]["tasks"], result["tasks"])


def flatten_scores(tasks: dict, task_info: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """opt-deus eval's per-model task block ({task: {"metrics": {"acc": 0.5, "acc_stderr": 0.1,
    "sample_len": 16, "exact_match,strict-match": 0.2}}}) and its task information ({task:
    {"metrics_higher_is_better": {"acc": True, "exact_match": True}}}: lm-eval's own
    `higher_is_better` of the task's metric list) as ({"task/acc": 0.5, ...}, {"task/acc": True,
    ...}). A key is a score when lm-eval gives its metric a direction: standard errors, sample
    counts and aliases are not scores, and a metric whose direction a group's tasks disagree on
    cannot say which recipe is ahead."""
    scores, higher = {}, {}
    for task, entry in tasks.items():
        directions = task_info.get(task, {}).get("metrics_higher_is_better") or {}
        for name, value in (entry.get("metrics") or {}).items():
            direction = directions.get(name.split(",")[0])  # "exact_match,strict-match": metric and filter
            if direction is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            scores[f"{task}/{name}"] = float(value)
            higher[f"{task}/{name}"] = bool(direction)
    return scores, higher
