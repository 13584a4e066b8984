"""OpT-DeUS on real weights beside random ones: per new layer and per run, exact and Sinkhorn.

The real checkpoint is SmolLM2-135M-Instruct (`make bench-model`: 30 layers, hidden 576, MLP
1536; top-half inserts 15 new layers between real adjacent layers). Beside it, a checkpoint of
the same shapes whose layers are independent random draws (the exact solver's hardest case,
the kind of checkpoint the 1B/8B figures in BENCHMARKS.md use). Each run is the CLI in a child
process (`opt-deus upscale ... --recipe top-half`, alignment.solver exact or sinkhorn); rounds
interleave the four runs; medians. Per new layer: the layer's seconds and its attention / MLP
split from the manifest, with the MLP assignment's own seconds (what real layers make faster).

    python -m benchmarks.real_layers [--model bench-out/models/smollm2-135m-instruct] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.io_bench import measure, opt_deus_command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "bench-out" / "models" / "smollm2-135m-instruct"
WORK = ROOT / "bench-out" / "real-layers"
SOLVERS = ("exact", "sinkhorn")


def random_twin(model: Path, out: Path) -> Path:
    """A checkpoint of `model`'s config (shapes, dtype) with independent random bf16 layers."""
    if not (out / "config.json").is_file():
        code = (
            "import json; from pathlib import Path; from benchmarks.eight_b import write_checkpoint; "
            f"config = json.loads(Path({str(model / 'config.json')!r}).read_text()); "
            "keys = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', "
            "'num_key_value_heads', 'head_dim', 'vocab_size', 'tie_word_embeddings', 'max_position_embeddings', "
            "'rms_norm_eps'); shapes = {k: config[k] for k in keys if k in config}; "
            f"write_checkpoint(Path({str(out)!r}), shapes)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return out


def recipe_file(solver: str) -> Path:
    from opt_deus_cli.recipe import shipped_recipes

    data = yaml.safe_load(Path(shipped_recipes()["top-half"]).read_text())
    data["alignment"]["solver"] = solver
    path = WORK / f"top-half-{solver}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_once(model: Path, solver: str) -> dict:
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    row = measure(
        opt_deus_command(
            "upscale", str(model), "--recipe", str(recipe_file(solver)), "--out", str(out), "--device", "cpu"
        )
    )
    manifest = json.loads((out / "opt-deus-manifest.json").read_text())
    new = [layer for layer in manifest["layers"] if layer["origin"] == "new"]
    row["layers"] = [
        {
            "index": layer["index"],
            "seconds": layer["seconds"],
            "attention_s": layer["report"]["attention"]["seconds"],
            "mlp_s": layer["report"]["mlp"]["seconds"],
            "mlp_cost_after": layer["report"]["mlp"]["cost_after"],
            "mlp_cost_before": layer["report"]["mlp"]["cost_before"],
        }
        for layer in new
    ]
    row["timings"] = manifest["timings"]
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no model at {args.model}; build it with `make bench-model`")
    WORK.mkdir(parents=True, exist_ok=True)
    models = {
        f"real ({args.model.name})": args.model,
        "random, same shapes": random_twin(args.model, WORK / "random-twin"),
    }
    runs: dict[tuple[str, str], list[dict]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for weights, model in models.items():
            for solver in SOLVERS:
                runs.setdefault((weights, solver), []).append(run_once(model, solver))
    load.append(os.getloadavg()[0])
    rows = []
    for (weights, solver), rs in runs.items():
        layers = [layer for r in rs for layer in r["layers"]]
        rows.append(
            {
                "weights": weights,
                "solver": solver,
                "new_layers": len(rs[0]["layers"]),
                "wall_s": statistics.median(r["seconds"] for r in rs),
                "cpu_s": statistics.median(r["cpu_seconds"] for r in rs),
                "peak_rss_mb": max(r.get("own_peak_rss_mb", r["peak_rss_mb"]) for r in rs),
                "layer_s": statistics.median(x["seconds"] for x in layers),
                "layer_s_range": [min(x["seconds"] for x in layers), max(x["seconds"] for x in layers)],
                "attention_s": statistics.median(x["attention_s"] for x in layers),
                "mlp_s": statistics.median(x["mlp_s"] for x in layers),
                "mlp_cost_after_over_before": statistics.median(
                    x["mlp_cost_after"] / x["mlp_cost_before"] for x in layers
                ),
                "layers_total_s": statistics.median(sum(x["seconds"] for x in r["layers"]) for r in rs),
            }
        )
    if args.json:
        print(json.dumps({"rounds": args.rounds, "load_avg": load, "rows": rows}, indent=1))
        return
    print(f"{args.rounds} interleaved rounds, load {load[0]:.2f} -> {load[1]:.2f}; top-half, --device cpu")
    print(
        "| weights | solver | new layers | wall s | CPU s | s per new layer (min-max) | attention / MLP s | "
        "MLP cost after/before | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weights']} | {r['solver']} | {r['new_layers']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['layer_s']:.3f} ({r['layer_s_range'][0]:.3f}-{r['layer_s_range'][1]:.3f}) | "
            f"{r['attention_s']:.3f} / {r['mlp_s']:.3f} | {r['mlp_cost_after_over_before']:.3f} | {r['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
