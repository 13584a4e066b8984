"""What a comparison is: the base, the recipes (by label), the data, the training options shared by
every run, the seeds and the tasks; the checks made before anything runs; and the settings that
make two comparisons comparable (kept as DIR/comparison.json, so a re-run adds to the same
comparison or is refused)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptDeusError, UsageError
from ..recipe import Recipe
from ..training.options import TrainOptions

SETTINGS_FILE = "comparison.json"
# TrainOptions fields that do not change what a run computes, or that compare sets per run
NOT_SETTINGS = ("seed", "overwrite", "cache_dir", "shard_size", "data", "eval_data")


@dataclass
class CompareSpec:
    base: Path  # a local model directory (hub ids are resolved by the caller)
    recipes: dict[str, Recipe]  # label -> recipe, in the order the table lists them
    data: tuple[Path, ...]
    options: TrainOptions  # shared by every run; seed set per run, eval_data = the held-out files
    seeds: tuple[int, ...]
    reference: str | None = None  # the label differences are taken against (default: the first recipe)
    tasks: tuple[str, ...] = ()  # lm-eval tasks through opt-deus eval
    task_options: dict = field(default_factory=dict)  # limit, num_fewshot, batch_size, include_path
    launcher: str | None = None  # e.g. "torchrun --nproc_per_node 8": the train step as a subprocess
    upscale_device: str = "auto"

    @property
    def reference_label(self) -> str:
        return self.reference or next(iter(self.recipes))


def with_train_fields(options: TrainOptions, values: dict) -> TrainOptions:
    """TrainOptions with the fields given on the command line (None: not given, the default stays)."""
    return dataclasses.replace(options, **{k: v for k, v in values.items() if v is not None})


def check(spec: CompareSpec) -> None:
    """Everything that can be refused before any work: options, files, recipes against the base
    (each named when it does not fit), the reference, the launcher's program, the tasks' module."""
    from ..job import resolve_job
    from ..options import Options
    from ..source import SourceModel
    from ..training.data import check_files

    if not spec.recipes:
        raise UsageError("--recipes lists no recipe; name at least two to compare (shipped names or YAML files)")
    if not spec.seeds:
        raise UsageError("--seeds lists no seed; give at least one, e.g. --seeds 0,1")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise UsageError(f"--seeds repeats a seed: {','.join(map(str, spec.seeds))}")
    if spec.reference_label not in spec.recipes:
        raise UsageError(f"--reference {spec.reference_label} is not one of --recipes ({', '.join(spec.recipes)})")
    spec.options.check()
    if spec.options.steps is None:
        raise UsageError("--steps is required: every run of a comparison trains for the same number of steps")
    check_files(list(spec.data), "--data")
    if spec.options.eval_data:
        check_files(list(spec.options.eval_data), "--eval-data")
    source = SourceModel.open(spec.base)
    for label, recipe in spec.recipes.items():
        try:
            resolve_job(source, recipe, Options(device="cpu"))
        except OptDeusError as e:
            raise UsageError(
                f"recipe {label} does not fit {spec.base}: {str(e).removeprefix(f'recipe {recipe.source}: ')}"
            ) from e
    if spec.launcher is not None:
        words = shlex.split(spec.launcher)
        if not words or shutil.which(words[0]) is None:
            raise UsageError(f"--launcher {spec.launcher!r}: no program {words[0] if words else '(empty)'!r} on PATH")
    if spec.tasks:
        from ..evaluation.tasks import check_names, select_tasks, task_manager

        # an unknown task is refused here, before any run, with the names lm-eval knows
        selection = select_tasks(list(spec.tasks), spec.task_options.get("num_fewshot"))
        check_names(selection.names, task_manager(spec.task_options.get("include_path"), selection.names))


def _sha256(path: Path) -> str:
    from ..checkpoint import sha256_file

    return sha256_file(path)


def settings(spec: CompareSpec) -> dict:
    """What every run of the comparison shares (JSON types only). Seeds and recipes are not in it:
    a re-run may add either; a recipe label already saved must keep its recipe."""
    return settings_record(
        base_record(spec.base),
        [{"name": p.name, "sha256": _sha256(p)} for p in spec.data],
        [{"name": p.name, "sha256": _sha256(p)} for p in spec.options.eval_data],
        spec,
    )


def base_record(base: Path) -> dict:
    """What a comparison keeps of its base: its config's sha256 and its weight files' sizes."""
    return {
        "config_sha256": hashlib.sha256((base / "config.json").read_bytes()).hexdigest(),
        "weights": {p.name: p.stat().st_size for p in sorted(base.glob("*.safetensors"))},
    }


def settings_record(base: dict, data: list[dict], eval_data: list[dict], spec: CompareSpec) -> dict:
    """The settings of `spec` with its base and data files as given (name and sha256 each)."""
    training = {k: v for k, v in dataclasses.asdict(spec.options).items() if k not in NOT_SETTINGS}
    record = {
        "base": base,
        "data": data,
        "eval_data": eval_data,
        "training": training,
        "tasks": list(spec.tasks),
        "task_options": spec.task_options,
    }
    return json.loads(json.dumps(record, default=str))


def _differences(saved, now, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(saved) | set(now), key=str):
            found += _differences(saved.get(key), now.get(key), f"{where}.{key}" if where else str(key))
        return found
    return [] if saved == now else [f"{where} (saved {json.dumps(saved)}, now {json.dumps(now)})"]


def load_or_start(spec: CompareSpec, out: Path) -> dict:
    """DIR/comparison.json after this call: the saved one extended by today's recipes and seeds,
    or a refusal naming the first setting that differs. Read, checked and written under a lock on
    DIR, so two comparisons started at once on the same --out (`--seeds 0` and `--seeds 1` side by
    side) add up: the second sees the first's file and agrees with it or is refused."""
    now = {
        "settings": settings(spec),
        "recipes": {k: r.to_dict() for k, r in spec.recipes.items()},
        "seeds": list(spec.seeds),
    }
    path = out / SETTINGS_FILE
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        if not path.is_file() and any(out.iterdir()):  # under the lock: a comparison writes this file first
            raise UsageError(
                f"--out {out} exists and holds no comparison ({SETTINGS_FILE} missing); choose an empty or new directory"
            )
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise OptDeusError(f"{path} is not readable JSON ({e}); move it away or use another --out") from e
            diffs = _differences(saved.get("settings"), now["settings"])
            diffs += [
                f"recipe {k} (saved {json.dumps(saved['recipes'][k])}, now {json.dumps(r)})"
                for k, r in now["recipes"].items()
                if k in saved.get("recipes", {}) and saved["recipes"][k] != r
            ]
            if diffs:
                more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
                raise UsageError(
                    f"--out {out} holds another comparison's runs: {diffs[0]} differs{more}; "
                    "use another --out, or the same settings to add recipes or seeds"
                )
            now["recipes"] = {**saved["recipes"], **now["recipes"]}
            now["seeds"] = sorted(set(saved["seeds"]) | set(spec.seeds))
        write_json_atomic(path, now)
    return now


@contextmanager
def locked(directory: Path):
    """An exclusive lock on `directory` itself (flock on its descriptor: no lock file is left
    behind) while the block runs; another process asking for it waits."""
    import fcntl
    import os

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json_atomic(path: Path, data) -> None:
    """A JSON file that is whole or absent."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """A text file that is whole or absent: written to a temporary file of its own beside it (a
    name no other process picks), flushed to disk, then renamed over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path):
    """A fresh temporary path beside `path` with its suffix (matplotlib reads the format from it)
    for the block to write; renamed over `path` when the block ends, removed if it fails."""
    from ..output import current_umask

    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the file is as open() would make it
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def with_evaluation(options: TrainOptions) -> TrainOptions:
    """With held-out files: an eval every tenth of the run unless --eval-every says otherwise, and
    one at step 0 (the deeper model as built), for the curves and the paired start."""
    if not options.eval_data:
        return options
    every = options.eval_every or max(1, (options.steps or 10) // 10)
    return dataclasses.replace(options, eval_every=every, trainer_args={"eval_on_start": True, **options.trainer_args})
