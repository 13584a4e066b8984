"""Running a part: the corpora as data files, every variant up-scaled once, then every run not yet
saved trained and measured by `opt-deus compare`'s own code (opt_deus_cli.compare.runner:
build_model, train_and_measure), one JSON per run written the moment it finishes. An interrupted
part resumes where it stopped; a run whose settings changed since it was saved is run again."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
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
    """Up-scale the base with the variant's recipe, as `opt-deus compare` does (kept and reused
    while recipe and base agree)."""
    from opt_deus_cli.checkpoint import read_config
    from opt_deus_cli.compare.runner import build_model
    from opt_deus_cli.recipe import parse_recipe

    m = MODELS[model]
    depth = read_config(m.dir)["num_hidden_layers"]
    recipe = parse_recipe(Variant.parse(name).recipe(m, depth), name)
    variant = build_model(m.dir, recipe, places.work / "models" / model / name, device="cpu")
    print(f"{model}/{name}: new layers {variant['new_layers']}", flush=True)
    return variant


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
    args = {
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": settings["warmup_steps"],
        "weight_decay": settings["weight_decay"],
        "adam_beta1": settings["adam_betas"][0],
        "adam_beta2": settings["adam_betas"][1],
        "max_grad_norm": settings["max_grad_norm"],
        "per_device_eval_batch_size": 16,
        "dataloader_num_workers": 0,
    }
    if evaluate:
        args["eval_on_start"] = True  # step 0: the deeper model as built
    return args


def run_one(job: dict) -> dict:
    """Train one variant with one seed through the tool, as `opt-deus compare` trains a run, and
    save its result file."""
    import torch

    torch.set_num_threads(1)  # the machine has 2 cores; at most 2 runs at once
    from opt_deus_cli.compare.runner import train_and_measure
    from opt_deus_cli.training import TrainOptions

    spec, settings = RunSpec(**job["spec"]), job["settings"]
    options = TrainOptions(
        train=spec.train,
        steps=spec.steps,
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        seq_len=settings["seq_len"],
        device=settings["device"],
        dtype=settings["dtype"],
        seed=spec.seed,
        eval_data=(Path(job["corpus"]["eval_file"]),) if spec.evaluate else (),
        eval_every=settings["eval_every"],
        trainer_args=trainer_arguments(settings, spec.evaluate),
        overwrite=True,
    )
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=job["scratch"]))
    m = train_and_measure(Path(job["variant"]["dir"]), [Path(job["corpus"]["train_file"])], options, work)
    evals = m["curves"]["eval_loss"]
    result = {
        "spec": asdict(spec),
        "settings": settings,
        "variant": job["variant"],
        "corpus": job["corpus"],
        "eval_steps": [s for s, _ in evals],
        "eval_loss": [loss for _, loss in evals],
        "train_loss": m["curves"]["train_loss"],
        **{
            k: m[k]
            for k in (
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
            )
        },
        "machine": machine(),
        "load_average": [load_before, os.getloadavg()],
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
    print(
        f"{len(specs) - len(todo)} of {len(specs)} runs already saved; {len(todo)} to run with {workers} worker(s)",
        flush=True,
    )
    scratch = places.work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    jobs = [
        {
            "spec": asdict(s),
            "settings": training_settings(s),
            "variant": variants[(s.model, s.variant)],
            "corpus": corpora[(s.model, s.domain)],
            "results": str(places.results),
            "scratch": str(scratch),
        }
        for s in todo
    ]
    started = time.perf_counter()

    def report(done: int, r: dict) -> None:
        results[RunSpec(**r["spec"]).key] = r
        losses = f"{r['eval_loss'][0]:.4f} -> {r['eval_loss'][-1]:.4f}, " if r["eval_loss"] else ""
        print(
            f"[{done}/{len(jobs)}] {RunSpec(**r['spec']).key}: {losses}{r['seconds_per_step']:.3f} s/step "
            f"({(time.perf_counter() - started) / 60:.1f} min)",
            flush=True,
        )

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
