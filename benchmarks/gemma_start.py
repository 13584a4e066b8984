"""The first training steps of an up-scaled real Gemma-3-270M: the old start (o_proj and
down_proj zeroed in front of Gemma's post-norms) against the new one (the post-norms' scale at 0,
o/down kept as built), for the quality study's main arms (issue 25, docs/method.md section 7).

Each arm is up-scaled twice by opt-deus: with its shipped recipe (the new start) and with
`zero_init: []` (the layers as built, nothing zeroed); the old start is the second with the new
layers' o_proj and down_proj weights set to zero, which is what opt-deus wrote before. Both are
function-preserving (checked: the base's loss on the first batch equals the up-scaled one's).
Then `opt-deus train` (transformers' Trainer, only the new layers trained, AdamW, lr 1e-4,
gradient clipping at 1.0, a loss and gradient-norm line every step) runs a few steps on the Gemma
terms of use (the licence text shipped with the model; blocks packed without <bos>, as `train`
does). Losses and gradient norms are deterministic, so the figures do not depend on the machine.

    python -m benchmarks.gemma3                 # once: bench-out/models/gemma-3-270m
    python -m benchmarks.gemma_start [--steps 6] [--seeds 0 1] [--out bench-out/gemma-start]

Writes results.json and prints the table that BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks.gemma3 import DEFAULT_OUT as GEMMA_DIR
from benchmarks.gemma3 import TERMS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-out" / "gemma-start"
# the quality study's main arms (benchmarks/quality/study.py), each one new layer between every pair
# of the top half (18 -> 27 layers): shipped recipes, and `copy` as the study has it (LLaMA-Pro's
# copy of the lower neighbour, at the same positions as the others)
ARMS = {
    "copy": {"method": "copy", "positions": "top", "count": "50%", "zero_init": ["o_proj", "down_proj"]},
    "upper-copy": "upper-copy",
    "top-half": "top-half",
    "opt-deus-reference": "opt-deus-reference",
}


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))


def corpus(model_dir: Path, out: Path) -> Path:
    """The Gemma terms as plain text (one paragraph a line)."""
    parser = _Text()
    parser.feed((model_dir / TERMS).read_text(encoding="utf-8"))
    path = out / "gemma-terms.txt"
    path.write_text("\n".join(parser.parts) + "\n")
    return path


def zero_branches(model_dir: Path) -> list[str]:
    """The old start: the new layers' o_proj and down_proj weights set to zero, in place."""
    import torch
    from safetensors.torch import load_file, save_file

    from opt_deus_cli.manifest import read_manifest

    manifest = read_manifest(model_dir, required=True)
    suffixes = tuple(
        f"layers.{i}.{p}.weight" for i in manifest.new_layers for p in ("self_attn.o_proj", "mlp.down_proj")
    )
    zeroed = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in tensors:
            if name.endswith(suffixes):
                tensors[name] = torch.zeros_like(tensors[name])
                zeroed.append(name)
        save_file(tensors, shard, metadata={"format": "pt"})
    return zeroed


def first_batch_loss(model_dir: Path, text: Path, seq_len: int) -> float:
    """Loss of a model on the corpus's first block (no <bos>, as `train` packs them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"][:seq_len]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        return model(input_ids=x, labels=x).loss.item()


def variants(base: Path, arm: str, work: Path) -> dict[str, Path]:
    """{"new": the shipped recipe's output, "old": o/down zeroed in front of the post-norms}."""
    from dataclasses import replace

    from opt_deus_cli.job import Options
    from opt_deus_cli.recipe import load_recipe, parse_recipe
    from opt_deus_cli.upscale import upscale

    recipe = load_recipe(ARMS[arm]) if isinstance(ARMS[arm], str) else parse_recipe(ARMS[arm], arm)
    work.mkdir(parents=True, exist_ok=True)
    dirs = {"new": work / f"{arm}-new", "old": work / f"{arm}-old"}
    if not (dirs["new"] / "opt-deus-manifest.json").is_file():
        upscale(base, recipe, dirs["new"], Options(device="cpu", overwrite=True))
    if not (dirs["old"] / "opt-deus-manifest.json").is_file():
        built = work / f"{arm}-built"
        upscale(base, replace(recipe, zero_init=()), built, Options(device="cpu", overwrite=True))
        zero_branches(built)
        built.rename(dirs["old"])
    return dirs


def train_steps(model_dir: Path, text: Path, args, seed: int, scratch: Path) -> list[dict]:
    from opt_deus_cli.training import TrainOptions, train

    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"trained-{model_dir.name}-{seed}"
    options = TrainOptions(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device="cpu",
        seed=seed,
        overwrite=True,
        trainer_args={"logging_steps": 1, "dataloader_num_workers": 0},
    )
    try:
        record = train(model_dir, [text], out, options)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return [
        {"step": row["step"], "loss": row["loss"], "grad_norm": row.get("grad_norm")}
        for row in record["history"]
        if "loss" in row
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=GEMMA_DIR, help="Gemma-3-270M checkpoint (benchmarks/gemma3.py)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        sys.exit(f"error: {args.model} is not a checkpoint; run `python -m benchmarks.gemma3` first")
    args.out.mkdir(parents=True, exist_ok=True)
    text = corpus(args.model, args.out)
    results = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_first_block_loss": first_batch_loss(args.model, text, args.seq_len),
        "runs": [],
    }
    print(f"base loss on the first block: {results['base_first_block_loss']:.4f}", flush=True)
    first: dict[Path, float] = {}
    for seed in args.seeds:  # every arm's first seed before any second one: a cut-short run still compares them
        for arm in args.arms:
            for start, model_dir in variants(args.model, arm, args.out / "models").items():
                if model_dir not in first:
                    first[model_dir] = first_batch_loss(model_dir, text, args.seq_len)
                t0 = time.perf_counter()
                steps = train_steps(model_dir, text, args, seed, args.out / "scratch")
                run = {
                    "arm": arm,
                    "start": start,
                    "seed": seed,
                    "first_block_loss": first[model_dir],
                    "steps": steps,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    """Markdown: one row per arm, start and seed; losses (gradient norms) per step."""
    steps = max(len(r["steps"]) for r in results["runs"])
    lines = [
        "| arm | start | seed | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " |",
        "|---|---|---|" + "---|" * steps,
    ]
    for r in results["runs"]:
        cells = [f"{s['loss']:.3f} ({s['grad_norm']:.3g})" for s in r["steps"]]
        lines.append(f"| {r['arm']} | {r['start']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
