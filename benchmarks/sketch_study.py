"""Is `alignment.sketch: K` (MLP neurons compared through a K-dimensional random projection of
their features) as good as the full cost? The four measures of issue 13, for the exact solver:

  align  per pair of layers and K: the share of the full-cost assignment the sketched one keeps;
         the matched cost measured with the FULL features, as the share of the full assignment's
         gain over the identity pairing that the sketch loses ((c_sketch - c_full) / (c_identity
         - c_full)); planted permutations (upper = neuron-permuted lower + noise) recovered or not;
         and the time of the cost and of LAPJV. Pairs: SmolLM2-135M-Instruct's top half (real
         weights, `make bench-model`), and random LLaMA-3.2-1B-shape layers, independent and planted.
  train  the quality study's question on the shipped tiny LLaMA: up-scale it by its top half with
         the full and the sketched cost, train only the new layers for the same budget (AdamW, the
         settings of the quality study), held-out loss at step 0 and at the end, per seed.

    python -m benchmarks.sketch_study align [--ks 128 256 512] [--pairs 15] [--json OUT]
    python -m benchmarks.sketch_study train [--ks 64 128 256] [--steps 60] [--seeds 0 1 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "bench-out" / "models" / "smollm2-135m-instruct"
TINY = ROOT / "examples" / "tiny-llama"


def _assignment(Xs, Ys, k: int | None):
    """(col, full-feature matched costs, cost seconds, LAPJV seconds) of the exact solver on the
    full features (k None) or on a k-dimensional sketch."""
    from opt_deus_cli import ot, solvers
    from opt_deus_cli.methods.opt_deus.mlp import matched_cost

    n = Xs[0].shape[0]
    start = time.perf_counter()
    A, B = (Xs, Ys) if k is None else ([ot.sketch_features(Xs, k)], [ot.sketch_features(Ys, k)])
    cost = ot.cost_matrix_blocks(A, B, "sqeuclidean", out=torch.empty((n, n), dtype=torch.float64))
    costed = time.perf_counter()
    col, _ = solvers.exact_assignment(cost)
    solved = time.perf_counter()
    return col, matched_cost(Xs, Ys, col, "sqeuclidean", torch.device("cpu")), costed - start, solved - costed


def compare(Xs, Ys, ks: list[int], planted: torch.Tensor | None = None) -> dict:
    """The measures for one pair of MLPs given as feature blocks (mlp_features)."""
    from opt_deus_cli.methods.opt_deus.mlp import identity_cost

    full, full_cost, cost_s, lap_s = _assignment(Xs, Ys, None)
    identity = float(identity_cost(Xs, Ys, "sqeuclidean", torch.device("cpu")).mean())
    row = {
        "n": int(full.numel()),
        "identity_cost": identity,
        "full": {"cost": float(full_cost.mean()), "cost_seconds": cost_s, "lapjv_seconds": lap_s},
    }
    if planted is not None:  # B's neuron j is A's planted[j]: A's i goes to argsort(planted)[i]
        row["full"]["planted_recovered"] = float((full == torch.argsort(planted)).double().mean())
    for k in ks:
        col, cost, cost_s, lap_s = _assignment(Xs, Ys, k)
        gain = identity - row["full"]["cost"]
        entry = {
            "kept": float((col == full).double().mean()),
            "cost": float(cost.mean()),
            "cost_excess": float(cost.mean()) / row["full"]["cost"] - 1,
            "gain_lost": (float(cost.mean()) - row["full"]["cost"]) / gain if gain > 0 else None,
            "cost_seconds": cost_s,
            "lapjv_seconds": lap_s,
        }
        if planted is not None:
            entry["planted_recovered"] = float((col == torch.argsort(planted)).double().mean())
        row[f"sketch {k}"] = entry
    return row


def align_study(ks: list[int], pairs: int) -> list[dict]:
    from benchmarks.one_layer import SHAPES, _blocks
    from opt_deus_cli.architectures import SUPPORTED, HeadLayout
    from opt_deus_cli.methods.opt_deus.mlp import mlp_features, mlp_paths
    from opt_deus_cli.source import SourceModel

    rows = []
    if (SMOLLM2 / "config.json").is_file():
        source = SourceModel.open(SMOLLM2)
        top = range(source.depth - 1 - pairs, source.depth - 1)
        for k in top:
            lower, upper, ctx = source.canonical_pair((k, k + 1), torch.device("cpu"))
            paths = mlp_paths(ctx.arch)
            rows.append(
                {"pair": f"smollm2 {k}-{k + 1}", **compare(mlp_features(lower, paths), mlp_features(upper, paths), ks)}
            )
            print(json.dumps({key: rows[-1][key] for key in ("pair", "full")}), flush=True)
    arch, layout = SUPPORTED["llama"], HeadLayout(**SHAPES["1b"])
    paths = mlp_paths(arch)
    for name, independent, noise in (
        ("1b independent", True, 0.5),
        ("1b planted, noise 0.5", False, 0.5),
        ("1b planted, noise 2", False, 2.0),
    ):
        lower, upper, moves = _blocks(layout, noise, independent, seed=0, with_moves=True)
        planted = None if moves is None else moves["gate"][1]  # B's neuron j is A's planted[j]
        rows.append({"pair": name, **compare(mlp_features(lower, paths), mlp_features(upper, paths), ks, planted)})
        print(json.dumps({key: rows[-1][key] for key in ("pair", "full")}), flush=True)
    return rows


def train_study(ks: list[int], steps: int, seeds: list[int], work: Path) -> list[dict]:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from benchmarks import training as T
    from opt_deus_cli.recipe import parse_recipe
    from opt_deus_cli.upscale import Options, upscale

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))  # the base's own, as the quality study reads it
    corpus = T.load_corpus(max_bytes=T.DEFAULT_MAX_BYTES)
    train_blocks = T.make_blocks(T.encode_documents(tok, corpus.train_texts), 128)
    held = T.make_blocks(T.encode_documents(tok, corpus.heldout_texts), 128)
    held = held[torch.linspace(0, held.shape[0] - 1, 48).long()]  # the quality study's fixed subset
    rows = []
    for k in [None, *ks]:
        alignment = {"mode": "corrected", "solver": "exact"} | ({"sketch": k} if k else {})
        recipe = parse_recipe(
            {
                "method": "opt-deus",
                "positions": "top",
                "count": "50%",
                "alignment": alignment,
                "zero_init": ["o_proj", "down_proj"],
            }
        )
        out = work / f"tiny-sketch-{k or 'full'}"
        manifest = upscale(TINY, recipe, out, Options(device="cpu", overwrite=True))
        mlp = [layer.report["mlp"] for layer in manifest.layers if layer.report]
        for seed in seeds:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            hist = T.train(
                model,
                train_blocks,
                held,
                steps=steps,
                lr=2e-4,
                batch_size=8,
                seed=seed,
                trainable_regex=manifest.trainable_parameter_regex,
                eval_every=steps,
            )
            rows.append(
                {
                    "sketch": k,
                    "seed": seed,
                    "step0": hist["heldout_loss"][0],
                    "final": hist["heldout_loss"][-1],
                    "mlp_cost_after": [m["cost_after"] for m in mlp],
                    "mlp_cost_before": [m["cost_before"] for m in mlp],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("align", "train"))
    p.add_argument("--ks", type=int, nargs="+")
    p.add_argument("--pairs", type=int, default=15, help="SmolLM2 pairs from the top (align)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=ROOT / "bench-out" / "sketch-study")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.time()
    if args.part == "align":
        rows = align_study(args.ks or [128, 256, 512], args.pairs)
    else:
        rows = train_study(args.ks or [64, 128, 256], args.steps, args.seeds, args.work)
    result = {
        "part": args.part,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_avg": [load, os.getloadavg()[0]],
        "seconds": time.time() - started,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
