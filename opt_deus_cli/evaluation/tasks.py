"""Which lm-evaluation-harness tasks an `opt-deus eval` runs: `paper` (the OpT-DeUS paper's
suite and settings) or names the harness knows (its own tasks, groups and tags, plus the YAML
tasks under --include-path), checked through its TaskManager before any model is loaded, and each
task's datasets loaded once up front so a missing dataset is one clear line, not a traceback
half-way through the first model."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptDeusError, UsageError

# The paper (arXiv 2508.08011) scores zero-shot on these seven tasks, reports their mean accuracy,
# and wikitext word perplexity beside it.
PAPER_TASKS = ("logiqa", "piqa", "winogrande", "arc_easy", "mmlu", "commonsense_qa", "boolq")
PAPER_PERPLEXITY_TASKS = ("wikitext",)
PAPER_NUM_FEWSHOT = 0

# The score a table shows for a task: the first of these its results carry (all are recorded).
HEADLINE_METRICS = (
    "acc",
    "exact_match",
    "acc_norm",
    "mcc",
    "f1",
    "word_perplexity",
    "perplexity",
    "byte_perplexity",
    "bits_per_byte",
)
LOWER_IS_BETTER = {"word_perplexity", "perplexity", "byte_perplexity", "bits_per_byte"}


@dataclass(frozen=True)
class TaskSelection:
    names: list[str]  # what lm-eval is asked for (tasks, groups or tags)
    num_fewshot: int | None  # None: each task's own default (0 where it sets none)
    suite: str | None  # "paper" when --tasks paper


def select_tasks(tasks: list[str] | str | None, num_fewshot: int | None = None) -> TaskSelection:
    """`paper` (alone) or task names; "a,b" strings are split. `paper` fixes zero-shot: another
    --num-fewshot with it is refused (it would not be the paper's setting)."""
    if tasks is None:
        return TaskSelection([], num_fewshot, None)
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if "paper" in names:
        if names != ["paper"]:
            raise UsageError("--tasks paper is the paper's whole suite; give it alone, or list task names instead")
        if num_fewshot not in (None, PAPER_NUM_FEWSHOT):
            raise UsageError(
                f"--tasks paper is zero-shot, as in the paper; drop --num-fewshot {num_fewshot} "
                "or list the tasks by name"
            )
        return TaskSelection([*PAPER_TASKS, *PAPER_PERPLEXITY_TASKS], PAPER_NUM_FEWSHOT, "paper")
    if len(set(names)) != len(names):
        raise UsageError(f"--tasks names a task twice: {', '.join(names)}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, not {num_fewshot}")
    return TaskSelection(names, num_fewshot, None)


def task_manager(include_path: Path | str | None = None, names: list[str] = ()):
    """lm-eval's TaskManager over the YAML tasks under include_path plus its own tasks. Indexing
    its own thousands of YAMLs takes a while, so when include_path alone has every name asked
    for, the manager holds those only (the same tasks either way: local ones take precedence)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path} is not a directory of task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if names and set(names) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=str(include_path))


def check_names(names: list[str], manager) -> None:
    """An unknown task is a usage error naming the closest names the harness knows."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UsageError(
                f"unknown task {name!r} (lm-eval knows {len(known)} tasks, groups and tags{hint}; "
                "local YAML tasks need --include-path DIR)"
            )


def load_tasks(names: list[str], manager) -> dict:
    """Build the tasks (which loads their datasets) once, before any model: a dataset that is
    not cached while offline, or that cannot be read, is one line naming it."""
    try:
        return manager.load(names)
    except OptDeusError:
        raise
    except Exception as e:
        raise dataset_error(names, manager, e) from e


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _dataset_of(names: list[str], manager, message: str) -> str:
    """The dataset a failure is about: named in the message, else the first task's config."""
    for name in names:
        entry = manager.task_index.get(name)
        cfg = (entry.cfg or {}) if entry is not None else {}
        path = cfg.get("dataset_path")
        if path and str(path) in message:
            return str(path)
    quoted = re.search(r"['\"]([\w.-]+/[\w.-]+)['\"]", message)
    if quoted:
        return quoted.group(1)
    for name in names:
        entry = manager.task_index.get(name)
        if entry is not None and entry.cfg and entry.cfg.get("dataset_path"):
            return str(entry.cfg["dataset_path"])
    return "its dataset"


def dataset_error(names: list[str], manager, error: Exception) -> OptDeusError:
    message = " ".join(str(error).split()) or type(error).__name__
    dataset = _dataset_of(names, manager, message)
    if _offline() or "offline" in message.lower() or "couldn't reach" in message.lower():
        return UsageError(
            f"dataset {dataset} (task {', '.join(names)}) is not in the local datasets cache and HF_DATASETS_OFFLINE "
            "(or HF_HUB_OFFLINE) is set: run once online to cache it, or point HF_HOME at a cache that has it"
        )
    return OptDeusError(f"lm-eval cannot load dataset {dataset} for task {', '.join(names)}: {message[:300]}")


def headline_metric(metrics: dict) -> str | None:
    """The metric a table shows for one task's results ({"acc": .., "acc_stderr": .., ...})."""
    for name in HEADLINE_METRICS:
        if isinstance(metrics.get(name), (int, float)):
            return name
    return next((k for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr")), None)
