"""The speed study: every timing figure the issues ask for, measured in one run.

1. `opt-deus upscale` of a LLaMA-3.2-1B-shape checkpoint (about 3 GB, bf16) per method, next to
   `cp -r` of the same directory (wall time and peak RSS, ratio to cp in the same run);
2. mergekit's passthrough on the same SOLAR-style layer plan, when a mergekit install is given
   (`--mergekit PATH/TO/mergekit-yaml`; install it in a separate environment, e.g.
   `python -m venv mk && mk/bin/pip install torch==2.13.0 mergekit`);
3. one new OpT-DeUS layer at 1B and 8B shapes, corrected (exact, Sinkhorn) next to reference
   (benchmarks/one_layer.py; reference's 10000 Sinkhorn iterations are extrapolated from a capped
   run, and marked so).

    python -m benchmarks.speed [--recipes llama-pro solar average top-half] [--mergekit PATH] [--skip-layers] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.io_bench import LLAMA_1B, dir_bytes, make_checkpoint, measure

ROOT = Path(__file__).resolve().parent.parent


def upscale_rows(base: Path, work: Path, recipes: list[str]) -> list[dict]:
    opt_deus = str(Path(sys.executable).with_name("opt-deus"))
    rows = []
    for recipe in recipes:
        copy_dir, out = work / "cp-copy", work / f"out-{recipe}"
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        cp = measure(["cp", "-r", str(base), str(copy_dir)])
        shutil.rmtree(copy_dir)
        up = measure([opt_deus, "upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", "cpu"])
        manifest = json.loads((out / "opt-deus-manifest.json").read_text())
        rows.append(
            {
                "tool": "opt-deus",
                "recipe": recipe,
                "method": manifest["recipe"]["method"],
                "layers": f"{manifest['base']['num_layers']} -> {manifest['output']['num_layers']}",
                "output_gb": round(dir_bytes(out) / 1e9, 3),
                "seconds": up["seconds"],
                "peak_rss_mb": up["peak_rss_mb"],
                "cp_seconds": cp["seconds"],
                "ratio_to_cp": round(up["seconds"] / cp["seconds"], 2),
            }
        )
        shutil.rmtree(out)
    return rows


def mergekit_row(mergekit: str, base: Path, work: Path, layers: int) -> dict:
    """mergekit passthrough with SOLAR's plan: [0, N - m) + [m, N), m = N / 4."""
    m = layers // 4
    config = {
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, layers - m]}]},
            {"sources": [{"model": str(base), "layer_range": [m, layers]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "bfloat16",
    }
    out = work / "out-mergekit"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(config, f)  # JSON is YAML
    copy_dir = work / "cp-copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    cp = measure(["cp", "-r", str(base), str(copy_dir)])
    shutil.rmtree(copy_dir)
    run = measure([mergekit, f.name, str(out), "--no-copy-tokenizer"])
    row = {
        "tool": "mergekit passthrough",
        "recipe": "solar-equivalent",
        "method": "stack",
        "layers": f"{layers} -> {2 * (layers - m)}",
        "output_gb": round(dir_bytes(out) / 1e9, 3),
        "seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "cp_seconds": cp["seconds"],
        "ratio_to_cp": round(run["seconds"] / cp["seconds"], 2),
    }
    shutil.rmtree(out)
    os.unlink(f.name)
    return row


def layer_rows(shapes: str, cases: list[str], max_iter: int | None) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "one_layer.py"), "--shapes", shapes, "--cases", *cases, "--json"]
    if max_iter:
        cmd += ["--max-iter", str(max_iter)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    found = json.loads(done.stdout)
    return found["rows"] if isinstance(found, dict) else found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--recipes", nargs="+", default=["llama-pro", "solar", "average", "top-half"])
    parser.add_argument("--mergekit", help="path of mergekit-yaml (another environment)")
    parser.add_argument("--skip-layers", action="store_true", help="skip the one-layer study")
    parser.add_argument(
        "--reference-max-iter",
        type=int,
        default=100,
        help="cap for reference Sinkhorn in the one-layer study (extrapolated to 10000)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(args.work / "llama-1b-shape", LLAMA_1B)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "input_gb": round(dir_bytes(base) / 1e9, 3),
        "upscale": upscale_rows(base, args.work, args.recipes),
    }
    if args.mergekit:
        result["upscale"].append(mergekit_row(args.mergekit, base, args.work, LLAMA_1B["num_hidden_layers"]))
    if not args.skip_layers:
        result["one_layer"] = (
            layer_rows("1b", ["corrected-exact", "corrected-sinkhorn"], None)
            + layer_rows("1b", ["reference"], args.reference_max_iter)
            + layer_rows("8b", ["corrected-exact"], None)
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; input {result['input_gb']} GB (LLaMA-3.2-1B shapes, bf16)")
    print(f"{'tool':<22} {'recipe':<18} {'layers':<9} {'out GB':>7} {'s':>8} {'peak MB':>8} {'cp s':>6} {'x cp':>6}")
    for r in result["upscale"]:
        print(
            f"{r['tool']:<22} {r['recipe']:<18} {r['layers']:<9} {r['output_gb']:>7} {r['seconds']:>8} "
            f"{r['peak_rss_mb']:>8} {r['cp_seconds']:>6} {r['ratio_to_cp']:>6}"
        )
    for r in result.get("one_layer", []):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
