"""The one place `opt-deus compare` calls `opt-deus eval` (lm-evaluation-harness tasks), through
its Python API `opt_deus_cli.evaluation.evaluate`, imported on first use: a comparison without
--tasks never loads it, and an installation without it fails with one line before any work."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UsageError


def evaluate_function():
    """opt_deus_cli.evaluation.evaluate, or the one-line error when it is not installed."""
    try:
        from ..evaluation import evaluate  # type: ignore[attr-defined]
    except ImportError:
        raise UsageError("--tasks needs opt-deus eval (opt_deus_cli.evaluation), which this installation lacks; "
                         "leave --tasks out to compare on eval loss")
    return evaluate


def task_scores(model_dir: Path, tasks: tuple[str, ...], options: dict) -> dict[str, float]:
    """{"task/metric": value} for one model: lm-eval's numeric metrics, standard errors left out."""
    evaluate = evaluate_function()
    result = evaluate([str(model_dir)], list(tasks), **options)
    return flatten_scores(result, str(model_dir))


def flatten_scores(result: dict, model: str) -> dict[str, float]:
    """lm-eval's `results` block ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}),
    found at the top of `result` or under the model's key, as {"task/acc": 0.5}."""
    block = result.get("results")
    if block is None and model in result:
        block = result[model].get("results", result[model])
    if not isinstance(block, dict):
        raise UsageError(f"opt-deus eval returned no lm-eval results block for {model} (keys: {', '.join(result)})")
    scores = {}
    for task, metrics in block.items():
        for name, value in (metrics or {}).items():
            metric = name.split(",")[0]  # "acc,none": the metric and lm-eval's filter
            if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            scores[f"{task}/{metric}"] = float(value)
    return scores


# lm-eval metrics where lower is better; the rest it reports (acc, acc_norm, exact_match, f1, mcc, bleu, ...) are higher-better
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "ter", "loss")


def lower_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1]
    return any(name == m or name.endswith("_" + m) or name.startswith(m) for m in LOWER_IS_BETTER)
