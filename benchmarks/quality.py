"""The quality study: up-scale the shipped tiny LLaMA by 50% in depth (8 -> 12 layers) with every
method, continue training each deeper model for the same token budget, and compare held-out loss.

* methods (new layers at the top half, count "50%" = 4): copy (LLaMA-Pro), average (AVG-DeUS),
  opt-deus corrected with the exact and the Sinkhorn solver, opt-deus reference, lesa (when the
  installed opt-deus accepts it); stack (SOLAR, overlap 2: [0,6) + [2,8)); and `base`, the 8-layer
  model trained for the same budget with no up-scaling (a control: does adding depth pay at all?);
* positions: opt-deus corrected (exact) at top, bottom, middle and top-bottom;
* regimes: `new` -- only the parameters matching the manifest's `trainable_parameter_regex`
  (for stack these are the duplicated layers 6..9), `all` -- every parameter.

Every run sees the same tokens per step (batch x context) for the same number of steps; seeds change
only the order of the training batches (the up-scaled weights are deterministic and built once per
method/position). Held-out loss is measured on a fixed, evenly spaced subset of the held-out split
(files never seen by the tokenizer or the pretraining run) every `--eval-every` steps.

    python -m benchmarks.quality                          # the full study (about an hour on 2 CPU cores)
    python -m benchmarks.quality --quick                  # smoke run, seconds
    python -m benchmarks.quality --device cuda --steps 500 --seeds 0,1,2,3,4
    python -m benchmarks.quality --timing-only --out DIR  # only re-measure the step times of a study in DIR
    python -m benchmarks.quality --render-only --out DIR  # only rewrite DIR's table and plot from its JSON

Writes OUT/quality.json (every run's history and the summary), OUT/quality.png and OUT/quality.md.
Step times per position are measured twice: each run's mean (as it happened, on a machine whose load
may drift) and, afterwards, interleaved round-robin in one process (comparable across positions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from benchmarks import training as T

DEFAULT_MODEL = REPO / "examples" / "tiny-llama"
ZERO = ["o_proj", "down_proj"]
# Recipes of the insertion methods, without positions/count (added per variant).
INSERTION = {
    "copy": {"method": "copy", "zero_init": ZERO},  # LLaMA-Pro: copy of the lower neighbour, writers zeroed
    "average": {"method": "average", "fusion": {"alpha": 0.5}},  # AVG-DeUS: no zero-init
    "opt-deus-exact": {"method": "opt-deus", "alignment": {"mode": "corrected", "solver": "exact"}, "zero_init": ZERO},
    "opt-deus-sinkhorn": {"method": "opt-deus", "alignment": {"mode": "corrected", "solver": "sinkhorn"}, "zero_init": ZERO},
    "opt-deus-reference": {"method": "opt-deus", "alignment": {"mode": "reference"}, "zero_init": ZERO},
    "lesa": {"method": "lesa"},
}
METHODS = ("base", "copy", "average", "stack", "opt-deus-exact", "opt-deus-sinkhorn", "opt-deus-reference", "lesa")
POSITIONS = ("top", "bottom", "middle", "top-bottom")
POSITION_METHOD = "opt-deus-exact"  # the method the position comparison uses
REGIMES = ("new", "all")
REGIME_TITLES = {"new": "only new layers trainable", "all": "all layers trainable"}

# lr 2e-4 is the rate the base model's pretraining ended at (2e-3 cosine-decayed to 10%). Restarting
# AdamW on the annealed model at 1e-3 (tried first) cost all-layer training ~0.2 nats within 10 steps,
# which would swamp the differences between methods; 2e-4 still costs ~0.02 (see BENCHMARKS.md).
FULL = dict(timing_rounds=10, seeds="0,1,2", steps=60, batch_size=8, context=128, lr=2e-4, eval_every=10, eval_blocks=48,
            max_corpus_bytes=T.DEFAULT_MAX_BYTES, methods=",".join(METHODS), positions=",".join(POSITIONS),
            regimes="new,all", position_regimes="new")
QUICK = dict(timing_rounds=1, seeds="0", steps=4, batch_size=2, context=64, lr=2e-4, eval_every=2, eval_blocks=4,
             max_corpus_bytes=300_000, methods="base,copy,stack,opt-deus-exact", positions="top,bottom",
             regimes="new,all", position_regimes="new")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base model directory (with tokenizer.json)")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "quality")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (training and up-scaling)")
    p.add_argument("--quick", action="store_true", help="smoke run: small corpus, few steps, few methods, one seed")
    p.add_argument("--seeds", help="comma-separated (default 0,1,2)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--context", type=int, help="tokens per training block")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay (default steps // 10)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-blocks", type=int, help="size of the fixed held-out subset")
    p.add_argument("--max-corpus-bytes", type=int)
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--positions", help=f"positions for {POSITION_METHOD}: subset of {','.join(POSITIONS)} ('' = none)")
    p.add_argument("--regimes", help="regimes of the method rows: new,all")
    p.add_argument("--position-regimes", help="regimes of the extra position rows (default new)")
    p.add_argument("--timing-rounds", type=int, default=None,
                   help="rounds of the interleaved step-time measurement per position (default 10; 0 = off)")
    p.add_argument("--timing-only", action="store_true",
                   help="only (re)measure the interleaved step times and add them to an existing OUT/quality.json")
    p.add_argument("--render-only", action="store_true",
                   help="re-summarise OUT/quality.json and rewrite the table and plot (no training)")
    p.add_argument("--workers", type=int, default=None, help="training processes at once (default 2 on CPU, 1 on CUDA)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    args.methods = _names(args.methods, METHODS, "--methods")
    args.positions = _names(args.positions, POSITIONS, "--positions")
    args.regimes = _names(args.regimes, REGIMES, "--regimes")
    args.position_regimes = _names(args.position_regimes, REGIMES, "--position-regimes")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)  # a fresh AdamW state needs a few steps to estimate its moments
    if args.workers is None:
        args.workers = 1 if args.quick or args.device != "cpu" else 2
    return args


def _names(text: str, allowed, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


# --------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One deeper (or the base) model: a method at a position."""

    method: str
    position: str | None  # None for base and stack (no insertion position)

    @property
    def name(self) -> str:
        return self.method if self.position in (None, "top") else f"{self.method}@{self.position}"

    def recipe(self) -> dict | None:
        if self.method == "base":
            return None
        if self.method == "stack":
            return {"method": "stack", "overlap": 2}  # SOLAR: [0, 6) + [2, 8) -> 12 layers
        return {**INSERTION[self.method], "positions": self.position, "count": "50%"}


def plan_runs(args) -> tuple[list[tuple[Variant, str]], dict]:
    """(variant, regime) pairs of the study, de-duplicated (the top position row *is* the
    opt-deus-exact method row), plus notes on what was left out and why."""
    notes = {}
    methods = list(args.methods)
    pairs: list[tuple[Variant, str]] = []

    def add(v: Variant, regime: str):
        if (v, regime) not in pairs:
            pairs.append((v, regime))

    for m in methods:
        position = None if m in ("base", "stack") else "top"
        for regime in args.regimes:
            if m == "base" and regime == "new":
                continue  # the base model has no new layers
            add(Variant(m, position), regime)
    for pos in args.positions:
        for regime in args.position_regimes:
            add(Variant(POSITION_METHOD, pos), regime)
    return pairs, notes


def build_variants(variants: list[Variant], model_dir: Path, work: Path, device: str) -> dict[str, dict]:
    """Up-scale each variant once (runs of every seed and regime share it)."""
    from opt_deus_cli.recipe import parse_recipe
    from opt_deus_cli.job import Options
    from opt_deus_cli.upscale import upscale

    built = {}
    for v in variants:
        if v.method == "base":
            built[v.name] = {"dir": str(model_dir), "regex": None, "new_layers": [], "function_preserving": True,
                             "num_layers": json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]}
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # reference mode warns by design; keep, don't print
            warnings.simplefilter("always")
            manifest = upscale(model_dir, parse_recipe(v.recipe(), v.name), work / v.name,
                               Options(device=device, overwrite=True)).to_dict()
        built[v.name] = {
            "dir": str(work / v.name), "recipe": v.recipe(), "regex": manifest["trainable_parameter_regex"],
            "new_layers": manifest["new_layers"], "function_preserving": manifest["function_preserving"],
            "num_layers": manifest["output"]["num_layers"], "upscale_seconds": round(time.perf_counter() - t0, 2),
            "warnings": sorted({str(w.message) for w in caught} | set(manifest["warnings"]))[:6],
        }
        print(f"built {v.name}: new layers {manifest['new_layers']}, function-preserving "
              f"{manifest['function_preserving']}, {built[v.name]['upscale_seconds']} s", flush=True)
    return built


# --------------------------------------------------------------------------- data and runs

def load_data(model_dir: Path, context: int, max_bytes: int, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train blocks and a fixed held-out subset, tokenised with the base model's own tokenizer
    (the same by-file split the base was pretrained with, so held-out files are unseen)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    corpus = T.load_corpus(max_bytes=max_bytes)
    train = T.make_blocks(T.encode_documents(tok, corpus.train_texts), context)
    held = T.make_blocks(T.encode_documents(tok, corpus.heldout_texts), context)
    # Evenly spaced, so the subset spans all held-out files rather than the first few.
    idx = torch.linspace(0, held.shape[0] - 1, min(eval_blocks, held.shape[0])).long()
    info = {"train_files": len(corpus.train), "heldout_files": len(corpus.heldout), "train_blocks": train.shape[0],
            "heldout_blocks": held.shape[0], "eval_blocks": len(idx), "eval_tokens": len(idx) * context}
    return train, held[idx], info


_DATA: dict = {}


def _init_worker(train_blocks, eval_blocks, threads: int):
    torch.set_num_threads(threads)  # the machine is shared: one thread per process
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _DATA["train"], _DATA["eval"] = train_blocks, eval_blocks


def run_one(job: dict) -> dict:
    """Load one variant in fp32, train it in one regime with one seed, return the history."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32)
    regex = job["regex"] if job["regime"] == "new" else None
    t0 = time.perf_counter()
    hist = T.train(model, _DATA["train"], _DATA["eval"], steps=job["steps"], lr=job["lr"], batch_size=job["batch_size"],
                   seed=job["seed"], trainable_regex=regex, eval_every=job["eval_every"], device=job["device"],
                   warmup=job["warmup"])
    secs = hist["step_seconds"][1:] or hist["step_seconds"]
    return {
        "variant": job["variant"], "regime": job["regime"], "seed": job["seed"],
        "eval_steps": hist["eval_steps"], "heldout_loss": hist["heldout_loss"], "train_loss": hist["train_loss"],
        "sec_per_step": hist["sec_per_step"], "median_sec_per_step": statistics.median(secs),
        "n_trainable": hist["n_trainable"], "n_params": hist["n_params"],
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }


def run_all(jobs: list[dict], train_blocks, eval_blocks, workers: int, on_done) -> list[dict]:
    if workers <= 1:
        _init_worker(train_blocks, eval_blocks, 1)
        return [on_done(run_one(j)) for j in jobs]
    # spawn: a clean interpreter per worker (no forked torch thread pools)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(train_blocks, eval_blocks, 1)) as pool:
        return [on_done(r) for r in pool.map(run_one, jobs)]


def interleaved_step_times(models: dict[str, dict], regimes: list[str], train_blocks, rounds: int, batch_size: int,
                           lr: float, device: str, steps: int = 3) -> dict:
    """Seconds per training step of each (variant, regime), measured round-robin in ONE process: on a
    shared machine the load drifts over an hour, so per-run means from different moments are not
    comparable, while steps interleaved within seconds of each other are. Each round trains every
    (variant, regime) for `steps` steps (fresh AdamW; the first step, which allocates state, is
    dropped). Reports the median and mean over rounds x (steps - 1) timed steps."""
    from transformers import AutoModelForCausalLM

    loaded = {name: AutoModelForCausalLM.from_pretrained(info["dir"], dtype=torch.float32) for name, info in models.items()}
    samples: dict[tuple[str, str], list[float]] = {(n, g): [] for n in loaded for g in regimes}
    tiny_eval = train_blocks[:1]  # T.train evaluates before and after; keep that negligible
    for r in range(rounds):
        for (name, regime), times in samples.items():
            regex = models[name]["regex"] if regime == "new" else None
            hist = T.train(loaded[name], train_blocks, tiny_eval, steps=steps, lr=lr, batch_size=batch_size, seed=1000 + r,
                           trainable_regex=regex, eval_every=steps, device=device, warmup=1)
            times += hist["step_seconds"][1:]
    return {f"{n}|{g}": {"median": statistics.median(t), "mean": statistics.fmean(t), "n": len(t)}
            for (n, g), t in samples.items()}


# --------------------------------------------------------------------------- summary

def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_reference(regime: str, present: set) -> str | None:
    """The row each row is compared with seed by seed: a seed fixes the data order for every variant,
    so per-seed differences cancel the order's effect, which dominates the seed-to-seed spread."""
    for name in (("base",) if regime == "all" else ()) + (POSITION_METHOD,):
        if (name, regime) in present:
            return name
    return None


def _paired(name: str, regime: str, seeds: list[int], final: dict, present: set) -> dict | None:
    ref = paired_reference(regime, present)
    diffs = [final[(name, regime, s)] - final[(ref, regime, s)] for s in seeds if (ref, regime, s) in final]
    return {"vs": ref, "diffs": diffs, **_stats(diffs)} if ref and diffs else None


def summarise(runs: list[dict], variants: dict[str, dict], base_loss: float) -> list[dict]:
    rows = []
    keys = list(dict.fromkeys((r["variant"], r["regime"]) for r in runs))
    final = {(r["variant"], r["regime"], r["seed"]): r["heldout_loss"][-1] for r in runs}
    for name, regime in keys:
        rs = sorted((r for r in runs if (r["variant"], r["regime"]) == (name, regime)), key=lambda r: r["seed"])
        steps = rs[0]["eval_steps"]
        curves = list(zip(*(r["heldout_loss"] for r in rs)))  # per eval step, over seeds
        info = variants[name]
        rows.append({
            "variant": name, "regime": regime, "seeds": [r["seed"] for r in rs],
            "new_layers": info["new_layers"], "function_preserving": info["function_preserving"],
            "n_trainable": rs[0]["n_trainable"], "n_params": rs[0]["n_params"],
            "step0_loss": rs[0]["heldout_loss"][0], "step0_minus_base": rs[0]["heldout_loss"][0] - base_loss,
            "final": _stats([r["heldout_loss"][-1] for r in rs]),
            "paired": _paired(name, regime, [r["seed"] for r in rs], final, set(keys)),
            "sec_per_step": _stats([r["sec_per_step"] for r in rs]),
            "median_sec_per_step": statistics.median(r["median_sec_per_step"] for r in rs),
            "curve": {"steps": steps, "mean": [statistics.fmean(c) for c in curves],
                      "min": [min(c) for c in curves], "max": [max(c) for c in curves]},
        })
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    base = result["base_heldout_loss"]
    lines = [
        (f"Base model held-out loss (fixed subset, {result['data']['eval_tokens']} tokens): **{base:.4f}**. "
         f"Budget per run: {s['steps']} steps x {s['batch_size']} x {s['context']} tokens = "
         f"{s['steps'] * s['batch_size'] * s['context']:,} tokens; seeds {', '.join(map(str, s['seeds']))}."),
        "",
        ("| variant | regime | layers trained | step-0 loss | final loss mean ± std | min | max | Δ vs base model | "
         "paired Δ per seed (vs) | s/step (mean) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        f = r["final"]
        trained = "all" if r["regime"] == "all" else ",".join(map(str, r["new_layers"]))
        lines.append(
            f"| {r['variant']} | {r['regime']} | {trained} | {r['step0_loss']:.4f} | {f['mean']:.4f} ± {f['std']:.4f} "
            f"| {f['min']:.4f} | {f['max']:.4f} | {f['mean'] - base:+.4f} | {_paired_cell(r)} | {r['sec_per_step']['mean']:.3f} |")
    pos = [r for r in result["summary"] if r["variant"].split("@")[0] == POSITION_METHOD]
    if pos:
        lines += ["", (f"Training-step time (forward + backward + AdamW step, first step excluded) of {POSITION_METHOD} "
                       "per position, mean over seeds of each run's mean (median in brackets):"), "",
                  "| position | new layers | regime | trainable params | s/step mean ± std | final loss mean ± std |",
                  "|---|---|---|---|---|---|"]
        for r in pos:
            position = r["variant"].split("@")[1] if "@" in r["variant"] else "top"
            t, f = r["sec_per_step"], r["final"]
            lines.append(f"| {position} | {','.join(map(str, r['new_layers']))} | {r['regime']} | {r['n_trainable']:,} "
                         f"| {t['mean']:.3f} ± {t['std']:.3f} ({r['median_sec_per_step']:.3f}) | {f['mean']:.4f} ± {f['std']:.4f} |")
    times = result.get("step_times")
    if times:
        names = list(dict.fromkeys(k.split("|")[0] for k in times))
        lines += ["", ("Training-step time measured interleaved (round-robin over positions in one process, so the "
                       "shared machine's load drifts equally over all; median of "
                       f"{next(iter(times.values()))['n']} steps each; load average "
                       f"{', '.join(f'{x:.1f}' for x in result.get('step_times_load_average', []))}):"), "",
                  "| position | new layers | new-only s/step | all-layers s/step | new-only / all |", "|---|---|---|---|---|"]
        for n in names:
            new, full = times.get(f"{n}|new"), times.get(f"{n}|all")
            layers = ",".join(map(str, result.get("variants", {}).get(n, {}).get("new_layers", [])))
            position = n.split("@")[1] if "@" in n else "top"
            lines.append(f"| {position} | {layers} | {new['median']:.3f} | {full['median']:.3f} | {new['median'] / full['median']:.2f} |")
    check = result["checks"]["step0_function_preserving"]
    lines += ["", (f"Step-0 check: function-preserving variants start at the base loss; largest |step-0 - base| = "
                   f"{check['max_abs_diff']:.2e} over {', '.join(check['variants']) or 'none'}.")]
    for key, note in result.get("notes", {}).items():
        lines.append(f"Note ({key}): {note}")
    return "\n".join(lines) + "\n"


def _paired_cell(row: dict) -> str:
    p = row.get("paired")
    if not p or p["vs"] == row["variant"]:
        return "(reference)" if p else ""
    return " ".join(f"{d:+.4f}" for d in p["diffs"]) + f" ({p['vs']})"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    method_rows = [r for r in rows if "@" not in r["variant"]]
    # positions panel: only the regimes the extra positions were run in (comparable rows)
    pos_regimes = result["settings"].get("position_regimes", list(REGIMES))
    pos_rows = [r for r in rows if r["variant"].split("@")[0] == POSITION_METHOD and r["regime"] in pos_regimes]
    panels = [(f"methods, {REGIME_TITLES[g]}", [r for r in method_rows if r["regime"] == g])
              for g in REGIMES if any(r["regime"] == g for r in method_rows)]
    if any("@" in r["variant"] for r in pos_rows):
        panels.append((f"{POSITION_METHOD} by position", pos_rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    base = result["base_heldout_loss"]
    colours = {}
    for ax, (title, rs) in zip(axes[0], panels):
        for r in rs:
            label = r["variant"] if title.startswith("methods") else f"{r['variant']} ({r['regime']})"
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            c = r["curve"]
            ax.plot(c["steps"], c["mean"], label=label, color=colour, lw=1.6)
            ax.fill_between(c["steps"], c["min"], c["max"], color=colour, alpha=0.2, lw=0)
        ax.axhline(base, color="k", ls="--", lw=0.8, label="base model (no training)")
        # The differences that matter are thousandths of a nat, while the variants that are not
        # function preserving start hundredths above: scale to the second half of the curves
        # (their start is clipped; step-0 values are in the table).
        late = [v for r in rs for v in r["curve"]["max"][len(r["curve"]["max"]) // 2:]] + [base]
        low = min(v for r in rs for v in r["curve"]["min"])
        high = max(late)
        pad = 0.15 * (high - low) + 1e-4
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    s = result["settings"]
    fig.suptitle(f"tiny-llama 8 -> 12 layers, {s['steps']} steps x {s['batch_size']} x {s['context']} tokens; "
                 f"mean over seeds {s['seeds']}, shaded min-max (y clipped)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "quality.json"
    from opt_deus_cli.devices import resolve_device

    device = str(resolve_device(args.device))
    if args.timing_only:
        return timing_only(args, json_path, device)
    if args.render_only:
        result = json.loads(json_path.read_text())
        result["summary"] = summarise(result["runs"], result["variants"], result["base_heldout_loss"])
        write_outputs(result, args.out)
        return 0
    pairs, notes = plan_runs(args)
    result = {
        "command": " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"device": device},
        "notes": notes,
    }
    train_blocks, eval_blocks, result["data"] = load_data(args.model, args.context, args.max_corpus_bytes, args.eval_blocks)
    print(f"data: {result['data']}", flush=True)

    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    result["base_heldout_loss"] = T.heldout_loss(base_model.to(device), eval_blocks, device=device)
    del base_model
    print(f"base held-out loss {result['base_heldout_loss']:.4f}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="quality-models-"))  # deeper checkpoints: a cache for this run only
    try:
        variants = build_variants(list(dict.fromkeys(v for v, _ in pairs)), args.model, work, device)
        result["variants"] = variants
        # Seed-major order: a slowdown of the shared machine spreads over all variants alike.
        jobs = [{"variant": v.name, "regime": regime, "seed": seed, "dir": variants[v.name]["dir"],
                 "regex": variants[v.name]["regex"], "steps": args.steps, "lr": args.lr,
                 "batch_size": args.batch_size, "eval_every": args.eval_every, "warmup": args.warmup, "device": device}
                for seed in args.seeds for v, regime in pairs]
        runs: list[dict] = []

        def on_done(r: dict) -> dict:
            runs.append(r)
            print(f"[{len(runs)}/{len(jobs)}] {r['variant']} {r['regime']} seed {r['seed']}: "
                  f"{r['heldout_loss'][0]:.4f} -> {r['heldout_loss'][-1]:.4f}, {r['sec_per_step']:.3f} s/step "
                  f"({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
            json_path.write_text(json.dumps(result | {"runs": runs, "partial": True}, indent=1) + "\n")  # survives a crash
            return r

        run_all(jobs, train_blocks, eval_blocks, args.workers, on_done)
        positions = {k: v for k, v in variants.items() if k.split("@")[0] == POSITION_METHOD}
        if args.timing_rounds and len(positions) > 1:
            result["step_times"] = interleaved_step_times(positions, list(REGIMES), train_blocks, args.timing_rounds,
                                                          args.batch_size, args.lr, device)
            result["step_times_load_average"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["summary"] = summarise(runs, variants, result["base_heldout_loss"])
    preserving = [r for r in result["summary"] if r["function_preserving"] and r["variant"] != "base"]
    result["checks"] = {"step0_function_preserving": {
        "variants": sorted({r["variant"] for r in preserving}),
        "max_abs_diff": max((abs(r["step0_minus_base"]) for r in preserving), default=0.0)}}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["runs"] = runs
    write_outputs(result, args.out)
    print(f"wrote {json_path}, {args.out / 'quality.md'}, {args.out / 'quality.png'} in {result['wall_seconds'] / 60:.1f} min")
    return 0


def timing_only(args, json_path: Path, device: str) -> int:
    """Add the interleaved step times to an existing study (same positions, batch, context, lr)."""
    result = json.loads(json_path.read_text())
    s = result["settings"]
    train_blocks, _, _ = load_data(args.model, s["context"], s["max_corpus_bytes"], 1)
    work = Path(tempfile.mkdtemp(prefix="quality-models-"))
    try:
        positions = build_variants([Variant(POSITION_METHOD, p) for p in s["positions"]], args.model, work, device)
        result["step_times"] = interleaved_step_times(positions, list(REGIMES), train_blocks, args.timing_rounds,
                                                      s["batch_size"], s["lr"], device)
        result["step_times_load_average"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["step_times_command"] = " ".join(["python -m benchmarks.quality", *sys.argv[1:]])
    write_outputs(result, args.out)
    return 0


def write_outputs(result: dict, out: Path) -> None:
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(result))
    plot(result, out / "quality.png")
    print(markdown(result))


if __name__ == "__main__":
    raise SystemExit(main())
