"""Wall time and peak RSS of `opt-deus upscale` next to `cp -r` of the same checkpoint, measured
in the same run (issue: streaming up-scaler core).

The checkpoint has LLaMA-3.2-1B shapes (hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 KV heads, vocab 128256, tied embeddings), random bf16 weights, saved by transformers in 1 GB
shards: about 2.5 GB. Each measured command runs as its own child process; its peak RSS comes
from the kernel's rusage of that child (os.wait4), so nothing of this script is counted.

    python -m benchmarks.io_bench [--work bench-out] [--recipes llama-pro solar] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)


def make_checkpoint(path: Path, shapes: dict, shard: str = "1GB") -> Path:
    """Build the checkpoint in a child process: a child's peak RSS starts at its parent's (Linux
    keeps ru_maxrss across fork and exec), so this process must stay small."""
    if not (path / "config.json").is_file():
        code = f"from benchmarks.io_bench import _save; _save({str(path)!r}, {shapes!r}, {shard!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    return path


def _save(path: str, shapes: dict, shard: str) -> None:
    path = Path(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **shapes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    tmp.rename(path)


def measure(cmd: list[str]) -> dict:
    """Run cmd as a child; wall seconds and the child's peak RSS in MB. Dirty pages of earlier
    commands are flushed first so one command's writeback does not slow the next."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"command": " ".join(cmd), "seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-out"))
    parser.add_argument("--recipes", nargs="+", default=["llama-pro"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(args.work / "llama-1b-shape", LLAMA_1B)
    opt_deus = str(Path(sys.executable).with_name("opt-deus"))
    rows = []
    copy_dir = args.work / "cp-copy"
    for recipe in args.recipes:
        out = args.work / f"out-{recipe}"
        cps = []
        for _ in range(2):  # cp before and after, averaged: page cache and writeback vary
            shutil.rmtree(copy_dir, ignore_errors=True)
            cps.append(measure(["cp", "-r", str(base), str(copy_dir)]))
            if not (out / "config.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                up = measure([opt_deus, "upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", "cpu"])
        cp = {"command": cps[0]["command"], "seconds": round(sum(c["seconds"] for c in cps) / 2, 2),
              "peak_rss_mb": max(c["peak_rss_mb"] for c in cps)}
        manifest = json.loads((out / "opt-deus-manifest.json").read_text())
        rows.append({
            "recipe": recipe,
            "layers": f"{manifest['base']['num_layers']} -> {manifest['output']['num_layers']}",
            "input_gb": round(dir_bytes(base) / 1e9, 3),
            "output_gb": round(dir_bytes(out) / 1e9, 3),
            "cp": cp, "upscale": up,
            "time_ratio_vs_cp": round(up["seconds"] / cp["seconds"], 2),
        })
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy_dir, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return
    print(f"machine: {machine}")
    print(f"{'recipe':<12} {'layers':<9} {'in GB':>6} {'out GB':>7} {'cp s':>6} {'cp MB':>7} {'upscale s':>9} {'upscale MB':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['recipe']:<12} {r['layers']:<9} {r['input_gb']:>6} {r['output_gb']:>7} {r['cp']['seconds']:>6} "
              f"{r['cp']['peak_rss_mb']:>7} {r['upscale']['seconds']:>9} {r['upscale']['peak_rss_mb']:>10} {r['time_ratio_vs_cp']:>6}")


if __name__ == "__main__":
    main()
