"""The one place `opt-deus compare` calls `opt-deus eval` (lm-evaluation-harness tasks), through
its Python API `opt_deus_cli.evaluation.evaluate`, imported on first use: a comparison without
--tasks never loads lm-eval."""

from __future__ import annotations

import math
from pathlib import Path


def task_scores(model_dir: Path, tasks: tuple[str, ...], options: dict) -> dict[str, float]:
    """{"task/metric": value} for one model: every numeric metric lm-eval reported per task,
    standard errors left out."""
    from ..evaluation import evaluate

    result = evaluate([str(model_dir)], list(tasks), **options)
    return flatten_scores(result["models"][0]["tasks"])


def flatten_scores(tasks: dict) -> dict[str, float]:
    """opt-deus eval's per-model task block ({task: {"metrics": {"acc,none": 0.5,
    "acc_stderr,none": 0.1, ...}}}, lm-eval's own metric names) as {"task/acc": 0.5}."""
    scores = {}
    for task, entry in tasks.items():
        for name, value in (entry.get("metrics") or {}).items():
            metric = name.split(",")[0]  # "acc,none": the metric and lm-eval's filter
            if (
                "stderr" in metric
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
                or math.isnan(value)
            ):
                continue
            scores[f"{task}/{metric}"] = float(value)
    return scores


# lm-eval metrics where lower is better; the rest it reports (acc, acc_norm, exact_match, f1, mcc, bleu, ...) are higher-better
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "ter", "loss")


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return any(name == m or name.endswith("_" + m) or name.startswith(m) for m in LOWER_IS_BETTER)
