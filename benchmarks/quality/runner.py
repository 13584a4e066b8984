"""Running a part: the corpora as data files, every variant up-scaled once, then every run not yet
saved trained through the tool (`opt_deus_cli.training.train`, transformers' Trainer), one JSON
per run written the moment it finishes. An interrupted part resumes where it stopped; a run whose
settings changed since it was saved is run again."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from . import data
from .study import MODELS, REPO, RunSpec, Variant, training_settings


@dataclass(frozen=True)
class Places:
    """Where a study keeps things: results (per-run JSON, committed) and work (data files, deeper
    checkpoints, trained outputs while a run lasts; git-ignored)."""

    results: Path = REPO / "benchmarks" / "results" / "quality"
    work: Path = REPO / "bench-out" / "quality"
    max_corpus_bytes: int = data.T.DEFAULT_MAX_BYTES
    eval_tokens: int | None = None  # None: the model's own sample size


def corpus_files(model: str, domain: str, places: Places) -> dict:
    m = MODELS[model]
    out = places.work / "data" / model / domain
    info = data.prepare(domain, m.dir, out, places.eval_tokens or m.eval_tokens, places.max_corpus_bytes)
    return info | {"train_file": str(out / "train.jsonl"), "eval_file": str(out / "eval.jsonl")}


def build_variant(model: str, name: str, places: Places) -> dict:
    """Up-scale the base with the variant's recipe (kept and reused while recipe and base agree)."""
    from opt_deus_cli.checkpoint import read_config
    from opt_deus_cli.job import Options
    from opt_deus_cli.manifest import read_manifest
    from opt_deus_cli.recipe import parse_recipe
    from opt_deus_cli.upscale import upscale

    m = MODELS[model]
    depth = read_config(m.dir)["num_hidden_layers"]
    recipe = parse_recipe(Variant.parse(name).recipe(m, depth), name)
    out = places.work / "models" / model / name
    manifest = read_manifest(out)
    base_files = {f.name: f.bytes for f in manifest.base.files} if manifest else None
    if manifest is None or manifest.recipe != recipe.to_dict() or base_files != _sizes(m.dir):
        start = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # reference mode warns by design; the manifest keeps it
            warnings.simplefilter("ignore")
            manifest = upscale(m.dir, recipe, out, Options(device="cpu", overwrite=True))
        print(f"built {model}/{name}: new layers {manifest.new_layers} in {time.perf_counter() - start:.1f} s", flush=True)
    return {"dir": str(out), "recipe": manifest.recipe, "new_layers": manifest.new_layers,
            "function_preserving": manifest.function_preserving, "warnings": manifest.warnings[:4],
            "upscale_seconds": manifest.timings.get("total")}


def _sizes(model_dir: Path) -> dict:
    return {p.name: p.stat().st_size for p in model_dir.glob("*.safetensors")}


def saved(spec: RunSpec, places: Places, variant: dict | None = None) -> dict | None:
    """The saved result of a run, if it was made with today's settings (and recipe)."""
    path = places.results / spec.key
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result["settings"] != training_settings(spec):
        return None
    if variant is not None and result["variant"]["recipe"] != variant["recipe"]:
        return None
    return result


def trainer_arguments(settings: dict, evaluate: bool) -> dict:
    """The TrainingArguments fields the tool's flags do not cover (its --args file)."""
    args = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
            "warmup_steps": settings["warmup_steps"], "weight_decay": settings["weight_decay"],
            "adam_beta1": settings["adam_betas"][0], "adam_beta2": settings["adam_betas"][1],
            "max_grad_norm": settings["max_grad_norm"], "per_device_eval_batch_size": 16,
            "dataloader_num_workers": 0}
    if evaluate:
        args["eval_on_start"] = True  # step 0: the deeper model as built
    return args


def run_one(job: dict) -> dict:
    """Train one variant with one seed through the tool and save its result file."""
    import torch

    torch.set_num_threads(1)  # the machine has 2 cores; at most 2 runs at once
    from opt_deus_cli.training import TrainOptions, train

    spec, settings = RunSpec(**job["spec"]), job["settings"]
    out = Path(tempfile.mkdtemp(prefix="run-", dir=job["scratch"])) / "trained"
    options = TrainOptions(
        train=spec.train, steps=spec.steps, lr=settings["lr"], batch_size=settings["batch_size"],
        seq_len=settings["seq_len"], device=settings["device"], dtype=settings["dtype"], seed=spec.seed,
        eval_data=(Path(job["corpus"]["eval_file"]),) if spec.evaluate else (), eval_every=settings["eval_every"],
        trainer_args=trainer_arguments(settings, spec.evaluate), overwrite=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        record = train(job["variant"]["dir"], [Path(job["corpus"]["train_file"])], out, options)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    history = record["history"]
    evals = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    result = {
        "spec": asdict(spec), "settings": settings, "variant": job["variant"], "corpus": job["corpus"],
        "eval_steps": [s for s, _ in evals], "eval_loss": [loss for _, loss in evals],
        "train_loss": [(row["step"], row["loss"]) for row in history if "loss" in row],
        "seconds_per_step": record["seconds_per_step"], "train_seconds": record["seconds"],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "trainable_parameters": record["trainable_parameters"], "total_parameters": record["total_parameters"],
        "tokens": record["tokens"], "train_blocks": record["train_blocks"], "eval_blocks": record["eval_blocks"],
        "data_sha256": [d["sha256"] for d in record["data"] + record["eval_data"]],
        "versions": record["versions"], "machine": machine(), "load_average": [load_before, os.getloadavg()],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = Path(job["results"]) / spec.key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    text = json.dumps(result, indent=1) + "\n"
    tmp.write_text(text)
    tmp.replace(path)  # a result file is whole or absent
    return json.loads(text)  # as a later session reads it back


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_specs(specs: list[RunSpec], places: Places, workers: int) -> list[dict]:
    """Run what is not saved yet; returns the results of all specs (saved and new)."""
    corpora = {key: corpus_files(*key, places) for key in dict.fromkeys((s.model, s.domain) for s in specs)}
    variants = {key: build_variant(*key, places) for key in dict.fromkeys((s.model, s.variant) for s in specs)}
    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        done = saved(s, places, variants[(s.model, s.variant)])
        if done is not None:
            results[s.key] = done
        else:
            todo.append(s)
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already saved; {len(todo)} to run with {workers} worker(s)", flush=True)
    scratch = places.work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    jobs = [{"spec": asdict(s), "settings": training_settings(s), "variant": variants[(s.model, s.variant)],
             "corpus": corpora[(s.model, s.domain)], "results": str(places.results), "scratch": str(scratch)}
            for s in todo]
    started = time.perf_counter()

    def report(done: int, r: dict) -> None:
        results[RunSpec(**r["spec"]).key] = r
        losses = f"{r['eval_loss'][0]:.4f} -> {r['eval_loss'][-1]:.4f}, " if r["eval_loss"] else ""
        print(f"[{done}/{len(jobs)}] {RunSpec(**r['spec']).key}: {losses}{r['seconds_per_step']:.3f} s/step "
              f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

    if workers <= 1:
        _init_worker()
        for i, job in enumerate(jobs, 1):
            report(i, run_one(job))
    elif jobs:
        # spawn: a clean interpreter per worker (no forked torch thread pools)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            for i, future in enumerate(as_completed([pool.submit(run_one, job) for job in jobs]), 1):
                report(i, future.result())
    return [results[s.key] for s in specs]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
