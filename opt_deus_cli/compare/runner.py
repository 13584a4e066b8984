"""Running a comparison: every recipe up-scaled once (DIR/models/LABEL, reused while recipe and
base agree), then every run (recipe x seed) not yet saved trained through `opt-deus train`'s
code, evaluated, and saved as one JSON file (DIR/runs/LABEL/seedS.json) the moment it ends. An
interrupted comparison resumes: saved runs are read back, not redone; a failed run is saved as
seedS.failed.json with its error and log, and tried again by the next call.

The train step runs in this process, or, with a launcher ("torchrun --nproc_per_node 8"), as
`LAUNCHER opt-deus train ...` in a subprocess per run, its output in DIR/logs/LABEL-seedS.log;
the record is then read from the trained model's manifest, as `opt-deus train` wrote it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..errors import OptDeusError
from .spec import CompareSpec, check, load_or_start, locked, write_json_atomic

Say = Callable[[str], None]  # one line of news for the user
Progress = Callable[[int, int, str], None]  # done, total, what runs now


def run_path(out: Path, label: str, seed: int, failed: bool = False) -> Path:
    return out / "runs" / label / (f"seed{seed}.failed.json" if failed else f"seed{seed}.json")


def saved_run(out: Path, label: str, seed: int) -> dict | None:
    import json

    path = run_path(out, label, seed)
    return json.loads(path.read_text()) if path.is_file() else None


def build_model(base: Path, recipe, out: Path, device: str = "auto") -> dict:
    """Up-scale `base` with `recipe` into `out`, or reuse what is there when its manifest records
    the same recipe and base weights; returns what a run record says of the model."""
    from ..manifest import read_manifest
    from ..options import Options
    from ..upscale import upscale

    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent):  # another comparison on this --out builds it, or waits here and reuses it
        manifest = read_manifest(out)
        if manifest is None or not built_from(manifest, base, recipe):
            with warnings.catch_warnings():  # reference mode warns by design; the manifest keeps its warnings
                warnings.simplefilter("ignore")
                manifest = upscale(base, recipe, out, Options(device=device, overwrite=True))
    return {
        "dir": str(out),
        "recipe": manifest.recipe,
        "new_layers": manifest.new_layers,
        "output_layers": manifest.output.num_layers,
        "function_preserving": manifest.function_preserving,
        "warnings": manifest.warnings[:4],
        "upscale_seconds": manifest.timings.get("total"),
    }


def built_from(manifest, base: Path, recipe) -> bool:
    """Whether `manifest` records an up-scaling of `base` as it is now with `recipe`: the same
    recipe (as JSON, the form the manifest keeps) and the same base files (every file upscale
    recorded: name, size, then sha256, computed only when the sizes agree)."""
    import json

    from ..hashing import hub_blob_sha256, sha256_file

    if manifest.recipe != json.loads(json.dumps(recipe.to_dict())):
        return False
    recorded = {f.name: (f.bytes, f.sha256) for f in manifest.base.files}
    files = [p for p in base.iterdir() if p.is_file()]
    if recorded.keys() != {p.name for p in files}:
        return False
    if any(recorded[p.name][0] != p.stat().st_size for p in files):
        return False
    return all(recorded[p.name][1] == (hub_blob_sha256(p) or sha256_file(p)) for p in files)


def train_flags(options, args_file: Path | None) -> list[str]:
    """`opt-deus train` flags for the TrainOptions fields that differ from the defaults: each field
    is the flag of its name (seq_len: --seq-len; eval_data: --eval-data, once per file; a bool:
    --name / --no-name), trainer_args the --args file."""
    from ..training.options import TrainOptions

    default = TrainOptions()
    flags: list[str] = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name == "trainer_args" or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    if args_file is not None:
        flags += ["--args", str(args_file)]
    return flags


def opt_deus_program() -> str:
    """The `opt-deus` script of this installation (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "opt-deus"
    return str(beside) if beside.is_file() else (shutil.which("opt-deus") or "opt-deus")


def train_under_launcher(launcher: str, model_dir: Path, data: tuple[Path, ...], out: Path, options, log: Path) -> dict:
    """`LAUNCHER opt-deus train ...` in a subprocess; the training record from OUT's manifest."""
    import yaml

    from ..manifest import read_manifest

    args_file = None
    if options.trainer_args:
        args_file = out.parent / "trainer-args.yaml"
        args_file.write_text(yaml.safe_dump(options.trainer_args))
    command = [
        *shlex.split(launcher),
        opt_deus_program(),
        "train",
        str(model_dir),
        "--data",
        *map(str, data),
        "--out",
        str(out),
        *train_flags(dataclasses.replace(options, overwrite=True), args_file),
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    manifest = read_manifest(out) if out.is_dir() else None
    if code != 0 or manifest is None or manifest.training is None:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        raise OptDeusError(f"the launched train step exited with code {code}" + (f": {tail[0]}" if tail else ""))
    return manifest.training


def _curve(history: list[dict], key: str) -> list[list[float]]:
    return [[row["step"], row[key]] for row in history if key in row]


def train_and_measure(
    model_dir: Path,
    data: list[Path],
    options,
    work: Path,
    launcher: str | None = None,
    log: Path | None = None,
    tasks: tuple[str, ...] = (),
    task_options: dict | None = None,
) -> dict:
    """The one way a run is trained and measured: train
    `model_dir` into work/trained (here, or under the launcher with its output in `log`), score
    the tasks on the trained model, remove work/, and return the measures."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trained = work / "trained"
    started = time.perf_counter()
    try:
        if launcher:
            record = train_under_launcher(launcher, model_dir, tuple(data), trained, options, log or work / "train.log")
        else:
            from ..training.run import train

            record = train(model_dir, list(data), trained, options)
        scores, higher = {}, {}
        if tasks:
            from .tasks import task_scores

            scores, higher = task_scores(trained, tasks, task_options or {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    history = record["history"]
    metrics = {"train_loss": record.get("final_loss"), "eval_loss": record.get("eval_loss"), **scores}
    return {
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "higher_is_better": {"train_loss": False, "eval_loss": False, **higher},  # tasks': lm-eval's word
        "start_eval_loss": next((row["eval_loss"] for row in history if "eval_loss" in row and row["step"] == 0), None),
        "curves": {"train_loss": _curve(history, "loss"), "eval_loss": _curve(history, "eval_loss")},
        "seconds_per_step": record.get("seconds_per_step"),
        "train_seconds": record.get("seconds"),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "steps": record.get("steps"),
        "tokens": record.get("tokens"),
        "world_size": record.get("world_size"),
        "train_blocks": record.get("train_blocks"),
        "eval_blocks": record.get("eval_blocks"),
        "trainable_parameters": record.get("trainable_parameters"),
        "total_parameters": record.get("total_parameters"),
        "data_sha256": [d["sha256"] for d in record.get("data", []) + record.get("eval_data", [])],
        "versions": record.get("versions"),
    }


def run_one(spec: CompareSpec, label: str, seed: int, model: dict, start_scores: dict, out: Path) -> dict:
    """Train one recipe's model with one seed, evaluate it, and save its run file."""
    options = dataclasses.replace(spec.options, seed=seed, overwrite=True)
    log = out / "logs" / f"{label}-seed{seed}.log"
    load_before = os.getloadavg()
    measured = train_and_measure(
        Path(model["dir"]),
        list(spec.data),
        options,
        out / "work" / f"{label}-seed{seed}",
        spec.launcher,
        log,
        spec.tasks,
        spec.task_options,
    )
    start = {"eval_loss": measured.pop("start_eval_loss"), **start_scores}
    result = {
        "recipe": label,
        "seed": seed,
        "status": "ok",
        "model": model,
        "start": start,
        **measured,
        "launcher": spec.launcher,
        "log": str(log.relative_to(out)) if spec.launcher else None,
        "load_average": [load_before, os.getloadavg()],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = run_path(out, label, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    run_path(out, label, seed, failed=True).unlink(missing_ok=True)
    return result


def start_scores(spec: CompareSpec, label: str, model: dict, out: Path) -> dict:
    """Task scores of a recipe's model as built (step 0), measured once per recipe and kept."""
    import json

    if not spec.tasks:
        return {}
    path = out / "models" / f"{label}.start-scores.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["recipe"] == model["recipe"]:
            return saved["scores"]
    from .tasks import task_scores

    scores, _ = task_scores(Path(model["dir"]), spec.tasks, spec.task_options)
    write_json_atomic(path, {"recipe": model["recipe"], "scores": scores})
    return scores


def run_comparison(spec: CompareSpec, out: Path, say: Say = print, progress: Progress | None = None) -> dict:
    """Run what is not saved yet; returns {"runs": [...], "failed": [...], "skipped": n, "ran": n}."""
    check(spec)
    load_or_start(spec, out)
    todo = [(label, seed) for seed in spec.seeds for label in spec.recipes]  # seed-major: load spreads alike
    saved = {key: saved_run(out, *key) for key in todo}
    skipped = sum(r is not None for r in saved.values())
    say(f"{skipped} of {len(todo)} runs already saved in {out}; {len(todo) - skipped} to run")
    models = {}
    for label, recipe in spec.recipes.items():
        if any(saved[(label, s)] is None for s in spec.seeds):
            models[label] = build_model(spec.base, recipe, out / "models" / label, spec.upscale_device)
            say(f"built {label}: {models[label]['output_layers']} layers, new {models[label]['new_layers']}")
    runs, failed, done = [], [], 0
    for label, seed in todo:
        if saved[(label, seed)] is not None:
            runs.append(saved[(label, seed)])
            continue
        if progress:
            progress(done, len(todo) - skipped, f"{label} seed {seed}")
        try:
            result = run_one(spec, label, seed, models[label], start_scores(spec, label, models[label], out), out)
            runs.append(result)
            ev = result["curves"]["eval_loss"]
            losses = f"eval loss {ev[0][1]:.4f} -> {ev[-1][1]:.4f}, " if ev else ""
            say(f"{label} seed {seed}: {losses}{result['seconds_per_step']} s/step")
        except OptDeusError as e:
            log = out / "logs" / f"{label}-seed{seed}.log"
            record = {
                "recipe": label,
                "seed": seed,
                "status": "failed",
                "error": str(e),
                "log": str(log.relative_to(out)) if log.is_file() else None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            run_path(out, label, seed).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_path(out, label, seed, failed=True), record)
            failed.append(record)
            say(f"{label} seed {seed}: FAILED ({e})" + (f"; log {log}" if log.is_file() else ""))
        done += 1
    if progress:
        progress(done, len(todo) - skipped, "done")
    with contextlib.suppress(OSError):  # each run removes its own work; another process may still be using work/
        (out / "work").rmdir()
    return {"runs": runs, "failed": failed, "skipped": skipped, "ran": len(todo) - skipped}
