"""Scoring models with lm-evaluation-harness: each MODEL loaded once with transformers, wrapped
in lm-eval's own `hf` model (HFLM) and handed to `lm_eval.simple_evaluate` with a TaskManager
(lm-eval does all the scoring), then, with the same loaded model, the perplexity of local text
files through opt_deus_cli.perplexity (the code `verify --text` runs)."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError
from ..perplexity import text_perplexity, tokenize_text
from .models import EvalModel, resolve_models, same_tokenizer
from .table import build_table, text_columns
from .tasks import LOWER_IS_BETTER, check_names, headline_metric, load_tasks, select_tasks, task_manager

# progress(done, total, description): one step per model
Progress = Callable[[int, int, str], None]


def evaluate(
    models: list[str],
    tasks: list[str] | str | None = None,
    include_path: Path | str | None = None,
    texts: tuple[Path | str, ...] | list[Path | str] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    device: str = "auto",
    dtype: str = "keep",
    progress: Progress | None = None,
) -> dict:
    """Score every model on lm-eval tasks and on local texts; the first model is the reference.

    models: MODEL arguments (Hub repo id, opt-deus output, Trainer `checkpoint-N` directory, or a
        model directory), in table order. tasks: "paper" (the paper's suite, zero-shot), task
        names ("a,b" strings are split), or None/[] for texts only. include_path: a directory of
        local task YAMLs. texts: local files scored for token and word perplexity. limit: at most
        this many documents per task (a fraction < 1: that share). num_fewshot: None keeps each
        task's default. batch_size: an int or "auto" (lm-eval's). device: auto | cpu | cuda[:N].
        dtype: keep (the stored dtype) | float32 | bfloat16 | float16.

    Returns a JSON-ready dict:
        "models": per model (in order) its path, kind, run and step (checkpoints), weight files with
            sha256 (and where they came from), tokenizer, notes, and
            "tasks": {task: {"metric", "value", "metrics": {every metric lm-eval reported}}},
            "texts": [{"file", "tokens", "words", "nll", "token_perplexity", "word_perplexity"}];
        "tasks": {task: {"metric", "higher_is_better", "metrics_higher_is_better" (lm-eval's direction of
            each score it reports: what is a score, beside counts such as sample_len), "version",
            "num_fewshot", "samples"}};
        "table": {"columns", "average_of", "rows": [{"model", "scores", "average", "delta"}], "notes"};
        "settings", "suite", "versions" (lm_eval, transformers, torch, python), "notes".
    Raises OptDeusError (a UsageError for bad arguments) before loading any model when an argument
    is wrong or a task's dataset cannot be read."""

    from ..devices import resolve_device, resolve_dtype

    selection = select_tasks(tasks, num_fewshot)
    texts = [Path(t) for t in texts]
    if not selection.names and not texts:
        raise UsageError("nothing to score: give --tasks and/or --text")
    for text in texts:
        if not text.is_file():
            raise UsageError(f"--text {text} is not a file")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive, not {limit}")
    _check_batch_size(batch_size)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    resolved = resolve_models(list(models))

    task_info, expanded, manager = {}, [], None
    if selection.names:
        _quiet_lm_eval()
        manager = task_manager(include_path, selection.names)
        check_names(selection.names, manager)
        for name in selection.names:  # one at a time: a failing dataset is named with its task
            loaded = load_tasks([name], manager)
            expanded.append((name, list(loaded["tasks"]), bool(loaded["groups"])))
    elif include_path is not None:
        raise UsageError("--include-path adds task YAMLs: give --tasks too")

    text_tokens_cache: dict = {}
    results = []
    for i, model in enumerate(resolved):
        if progress:
            progress(i, len(resolved), f"model {i + 1}/{len(resolved)}: {model.spec}")
        results.append(
            _score_model(
                model,
                selection,
                expanded,
                manager,
                texts,
                text_tokens_cache,
                limit,
                batch_size,
                dev,
                torch_dtype,
                task_info,
            )
        )
    if progress:
        progress(len(resolved), len(resolved), "done")

    notes = _tokenizer_notes(resolved)
    columns = list(results[0]["tasks"])  # the same tasks for every model, in --tasks order
    table = build_table(results, columns, task_info, text_columns(texts), notes)
    return {
        "models": results,
        "tasks": task_info,
        "table": table,
        "suite": selection.suite,
        "settings": {
            "tasks": selection.names,
            "include_path": str(include_path) if include_path else None,
            "texts": [str(t) for t in texts],
            "limit": limit,
            "num_fewshot": selection.num_fewshot,
            "batch_size": batch_size,
            "device": str(dev),
            "dtype": dtype,
        },
        "versions": _versions(),
        "notes": notes,
    }


def _check_batch_size(batch_size: int | str) -> None:
    if isinstance(batch_size, str) and batch_size != "auto" and not batch_size.startswith("auto:"):
        raise UsageError(f"--batch-size {batch_size!r} not understood; give a number or auto")
    if isinstance(batch_size, int) and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")


def _quiet_lm_eval() -> None:
    """lm-eval logs every request at INFO and warns that a loaded model ignores model_args; our
    report says what ran."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def _score_model(
    model: EvalModel,
    selection,
    expanded,
    manager,
    texts,
    text_tokens_cache,
    limit,
    batch_size,
    device,
    torch_dtype,
    task_info: dict,
) -> dict:
    from transformers import AutoTokenizer

    from ..verify import load_model

    loaded = load_model(model.path, device, torch_dtype if torch_dtype is not None else "auto")
    record = model.describe()
    record["dtype"] = str(next(loaded.parameters()).dtype).removeprefix("torch.")
    record["num_layers"] = loaded.config.num_hidden_layers
    record["tasks"] = {}
    if selection.names:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_dir, local_files_only=True, trust_remote_code=False)
        lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=selection.names,
            num_fewshot=selection.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
        record["tasks"] = _task_scores(output, expanded, task_info)
    record["texts"] = []
    for text in texts:
        key = (str(model.tokenizer_dir.resolve()), str(text))
        if key not in text_tokens_cache:
            text_tokens_cache[key] = tokenize_text(model.tokenizer_dir, text)
        record["texts"].append(text_perplexity(loaded, text_tokens_cache[key], device))
    del loaded
    return record


def _columns(name: str, leaves: list[str], is_group: bool, results: dict) -> list[str]:
    """The table columns of one --tasks name: a task, or a group that aggregates its tasks, is one
    column; a tag, or a group without an aggregate, is the tasks it names."""
    if (is_group and _metrics(results.get(name, {}))) or leaves == [name]:
        return [name]
    return leaves


def _metrics(raw: dict) -> dict:
    """lm-eval's "acc,none" keys as "acc" (other filters keep their suffix), numbers only."""
    found = {}
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        found[metric if filt in ("", "none") else key] = value
    return found


def _task_scores(output: dict, expanded, task_info: dict) -> dict:
    scores = {}
    for name, leaves, is_group in expanded:
        for column in _columns(name, leaves, is_group, output["results"]):
            metrics = _metrics(output["results"].get(column, {}))
            metric = headline_metric(metrics)
            scores[column] = {"metric": metric, "value": metrics.get(metric), "metrics": metrics}
            directions = output.get("higher_is_better", {}).get(column, {})  # lm-eval's: one per metric of the task
            higher = directions.get(metric)
            samples = output.get("n-samples", {}).get(column) or {}
            task_info.setdefault(
                column,
                {
                    "metric": metric,
                    "higher_is_better": bool(higher) if higher is not None else metric not in LOWER_IS_BETTER,
                    # which of `metrics` are scores, and their direction (None: a group's tasks disagree)
                    "metrics_higher_is_better": dict(directions),
                    "version": output.get("versions", {}).get(column),
                    "num_fewshot": output.get("n-shot", {}).get(column),
                    "samples": samples.get("effective", samples.get("original")),
                    "subtasks": sorted(leaves) if is_group and column == name else None,
                },
            )
    return scores


def _tokenizer_notes(models: list[EvalModel]) -> list[str]:
    """Different tokenizers are allowed; the table says which models have one, since their token
    counts (and token-level perplexities) are not comparable with the reference's."""
    reference = models[0]
    notes = [f"{m.spec}: {note}" for m in models for note in m.notes]
    differ = [m.spec for m in models[1:] if not same_tokenizer(m.tokenizer_dir, reference.tokenizer_dir)]
    if differ:
        notes.append(
            f"{', '.join(differ)} use a tokenizer other than the reference {reference.spec}'s: accuracies and "
            "word perplexities compare, token-level perplexities do not"
        )
    return notes


def _versions() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    return {
        "lm_eval": version("lm_eval"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
