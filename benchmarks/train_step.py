"""Step time of `opt-deus train`: only the new layers trainable (`--train new`) against every
layer (`--train all`), for new layers at the top and at the bottom of the shipped model.

examples/tiny-llama (8 layers) is up-scaled twice with OpT-DeUS, 8 -> 12 layers: the shipped
`top-half` recipe (new layers 4, 6, 8, 10) and the same recipe at the bottom (new 1, 3, 5, 7).
Each model is then trained by the `opt-deus train` command itself (a child process per run) on a
JSONL file of CPython standard-library sources (benchmarks/training.py's training split), and the
training record gives the median seconds per optimizer step (the first, warm-up step left out).
Runs alternate between the modes and repeat, so drifting machine load hits both alike.

    python -m benchmarks.train_step [--steps 12] [--repeats 3] [--batch-size 8] [--seq-len 256] [--device cuda --dtype bfloat16] [--json]

Run it under the heavy-job lock: `flock /tmp/opt-deus-heavy.lock .venv/bin/python -m benchmarks.train_step`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "examples" / "tiny-llama"
WORK = ROOT / "bench-out" / "train-step"
RECIPES = {  # position -> recipe (the shipped top-half at the top, its mirror at the bottom)
    "top": "top-half",
    "bottom": {"method": "opt-deus", "positions": "bottom", "count": "50%", "zero_init": ["o_proj", "down_proj"]},
}


def opt_deus(*args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("opt-deus")), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def prepare(work: Path) -> tuple[dict[str, Path], Path]:
    """The two up-scaled models and the training file (made once, reused by later runs)."""
    import yaml

    from benchmarks.training import load_corpus

    models = {}
    for position, recipe in RECIPES.items():
        out = work / f"tiny-llama-{position}"
        if not (out / "opt-deus-manifest.json").is_file():
            if isinstance(recipe, dict):
                path = work / f"{position}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                recipe = str(path)
            opt_deus("upscale", str(SHIPPED), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--overwrite")
        models[position] = out
    data = work / "stdlib-train.jsonl"
    if not data.is_file():
        corpus = load_corpus(max_bytes=2_000_000)
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus.train_texts))
    return models, data


def run_once(model: Path, data: Path, mode: str, args, out: Path) -> dict:
    result = opt_deus(
        "train",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--train",
        mode,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--cache-dir",
        str(WORK / "datasets-cache"),
        "--overwrite",
        "--json",
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", help="weights while training: float32 | bfloat16 | float16")
    parser.add_argument("--positions", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    models, data = prepare(WORK)
    models = {position: models[position] for position in args.positions}
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for position, model in models.items():
            for mode in ("new", "all"):
                record = run_once(model, data, mode, args, WORK / f"trained-{position}-{mode}")
                runs.setdefault((position, mode), []).append(record)
                print(f"repeat {repeat}: {position} {mode}: {record['seconds_per_step']:.3f} s/step", file=sys.stderr)
    load_after = os.getloadavg()[0]
    rows = []
    for (position, mode), records in runs.items():
        per_step = [r["seconds_per_step"] for r in records]
        rows.append(
            {
                "position": position,
                "train": mode,
                "new_layers": json.loads((models[position] / "opt-deus-manifest.json").read_text())["new_layers"],
                "trainable_parameters": records[0]["trainable_parameters"],
                "total_parameters": records[0]["total_parameters"],
                "seconds_per_step": statistics.median(per_step),
                "runs": per_step,
                "tokens_per_step": records[0]["tokens"] // records[0]["steps"],
            }
        )
    for row in rows:
        all_row = next(r for r in rows if r["position"] == row["position"] and r["train"] == "all")
        row["vs_all"] = row["seconds_per_step"] / all_row["seconds_per_step"]
    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "torch_threads": records[0]["torch_threads"],
        "load_before": load_before,
        "load_after": load_after,
        "python": platform.python_version(),
        "versions": records[0]["versions"],
    }
    shutil.rmtree(WORK / "datasets-cache", ignore_errors=True)
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    print(
        f"load average {load_before:.2f} -> {load_after:.2f}; {args.steps} steps x {args.repeats} runs, "
        f"batch {args.batch_size} x {args.seq_len} tokens"
    )
    print("| position | new layers | --train | trainable params | s/step (median) | runs | vs all |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['position']} | {row['new_layers']} | {row['train']} | "
            f"{row['trainable_parameters'] / 1e6:.2f}M of {row['total_parameters'] / 1e6:.2f}M | {row['seconds_per_step']:.3f} | "
            f"{', '.join(f'{s:.3f}' for s in row['runs'])} | {row['vs_all']:.2f} |"
        )


if __name__ == "__main__":
    main()
