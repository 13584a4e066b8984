"""The shipped model (examples/tiny-llama, 8 layers, 512 MLP neurons), the goals of issue 24
part 3: OpT-DeUS corrected/exact at least 20x faster than the reference mode per new layer, and
the whole top-half run within 1.5x of the copy recipe's (llama-pro) wall time. Each recipe runs
as the CLI in a child process, round by round interleaved; medians. The sha256 of every output
shard is printed, to compare outputs before and after a change.

    python -m benchmarks.shipped [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
from pathlib import Path

from benchmarks.io_bench import measure, opt_deus_command

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "examples" / "tiny-llama"
RECIPES = ("llama-pro", "top-half", "opt-deus-reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "shipped")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {r: [] for r in RECIPES}
    load = [os.getloadavg()[0]]
    digests = {}
    for _ in range(args.rounds):
        for recipe in RECIPES:
            out = args.work / recipe
            shutil.rmtree(out, ignore_errors=True)
            row = measure(
                opt_deus_command("upscale", str(SHIPPED), "--recipe", recipe, "--out", str(out), "--device", "cpu")
            )
            manifest = json.loads((out / "opt-deus-manifest.json").read_text())
            row["layer_seconds"] = [layer["seconds"] for layer in manifest["layers"] if layer["origin"] == "new"]
            row["plan_seconds"] = manifest["timings"]["plan"]
            runs[recipe].append(row)
            digests[recipe] = {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))
            }
    load.append(os.getloadavg()[0])
    summary = {}
    for recipe, rows in runs.items():
        summary[recipe] = {
            "wall_s": statistics.median(r["seconds"] for r in rows),
            "cpu_s": statistics.median(r["cpu_seconds"] for r in rows),
            "layer_s": statistics.median(s for r in rows for s in r["layer_seconds"])
            if rows[0]["layer_seconds"]
            else None,
            "layers_total_s": statistics.median(sum(r["layer_seconds"]) for r in rows),
            "plan_s": statistics.median(r["plan_seconds"] for r in rows),
            "peak_rss_mb": max(r.get("own_peak_rss_mb", r["peak_rss_mb"]) for r in rows),
        }
    goals = {
        "reference_over_exact_per_layer": summary["opt-deus-reference"]["layer_s"] / summary["top-half"]["layer_s"],
        "top_half_over_copy_wall": summary["top-half"]["wall_s"] / summary["llama-pro"]["wall_s"],
    }
    result = {
        "rounds": args.rounds,
        "load_avg": load,
        "summary": summary,
        "goals": goals,
        "sha256": digests,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.rounds} interleaved rounds, load {load[0]:.2f} -> {load[1]:.2f}")
    print("| recipe | wall s | CPU s | plan s | s per new layer | new layers s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for recipe, s in summary.items():
        per_layer = f"{s['layer_s']:.3f}" if s["layer_s"] is not None else "-"
        print(
            f"| {recipe} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | {s['plan_s']:.2f} | {per_layer} | "
            f"{s['layers_total_s']:.2f} | {s['peak_rss_mb']} |"
        )
    print(
        f"reference / exact per new layer: {goals['reference_over_exact_per_layer']:.1f}x (goal >= 20); "
        f"top-half / llama-pro wall: {goals['top_half_over_copy_wall']:.2f}x (goal <= 1.5)"
    )
    for recipe, files in digests.items():
        for name, digest in files.items():
            print(f"sha256 {recipe}/{name} {digest}")


if __name__ == "__main__":
    main()
