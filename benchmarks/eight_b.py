"""The whole 8B-shape run, for real: a random LLaMA-3.1-8B-shape checkpoint (bf16, 32 layers,
hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256, untied embeddings: 16 GB in 1 GB
shards) up-scaled with `opt-deus upscale ... --recipe top-half` (32 -> 48 layers, 16 new
OpT-DeUS layers), next to `cp -r` of the same checkpoint in the same run.

Each command runs as a child process (os.wait4): wall time, CPU time (user + sys) and peak RSS
are that child's (the CLI's own peak RSS, and the kernel's figure, which also covers its forked
assignment process: that one maps the CLI's pages, shared copy-on-write, so it over-counts;
and the peak PSS of the process tree, sampled every 0.2 s, which splits shared pages and so
gives the memory the CLI and its child hold together);
`sync` runs first. The checkpoint's layers are independent random draws: the
exact solver's hardest case. The checkpoint is written here tensor by tensor (never more than one
1 GB shard in memory) and, with the output, deleted afterwards unless --keep. It needs ~16 GB of
disk for the checkpoint and ~24 GB for the output.

    python -m benchmarks.eight_b [--work bench-out/eight-b] [--recipe top-half] [--sketch K] [--memory-budget 4GB] [--keep] [--json]
    python -m benchmarks.eight_b --shapes 1b [--sketch K]     # the same measure on io_bench's 1B-shape checkpoint (kept)
    python -m benchmarks.eight_b --device cuda --solver sinkhorn --count 4 [--keep]   # on a GPU, 4 new layers
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

from benchmarks.io_bench import dir_bytes, measure, opt_deus_command

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)


def write_checkpoint(path: Path, shapes: dict, shard: str = "1GB", seed: int = 0) -> Path:
    """A random bf16 LLaMA checkpoint in Hugging Face's layout, written shard by shard with the
    tool's own writer (names, index, config as transformers saves them)."""
    import torch
    from transformers import AutoConfig

    from opt_deus_cli.architectures import SUPPORTED, HeadLayout, expected_block_shapes
    from opt_deus_cli.checkpoint import TensorMeta
    from opt_deus_cli.shards import ShardWriter, parse_size

    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.for_model("llama", **shapes, dtype="bfloat16")
    arch = SUPPORTED["llama"]
    layout = HeadLayout.from_config(config.to_dict(), arch)
    hidden, vocab = shapes["hidden_size"], shapes["vocab_size"]
    entries = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(shapes["num_hidden_layers"]):
        entries += [
            (arch.layer_prefix(i) + rel, shape) for rel, shape in sorted(expected_block_shapes(arch, layout).items())
        ]
    entries += [("model.norm.weight", (hidden,))]
    if not shapes.get("tie_word_embeddings"):
        entries += [("lm_head.weight", (vocab, hidden))]
    generator = torch.Generator().manual_seed(seed)

    def rand(shape) -> torch.Tensor:  # row chunks: no full-size float32 temporary
        if len(shape) == 1:
            return (1 + 0.1 * torch.randn(shape, generator=generator)).bfloat16()
        out = torch.empty(shape, dtype=torch.bfloat16)
        for i in range(0, shape[0], 4096):
            out[i : i + 4096] = 0.02 * torch.randn((min(4096, shape[0] - i), shape[1]), generator=generator)
        return out

    writer = ShardWriter(tmp, [(n, TensorMeta(torch.bfloat16, s)) for n, s in entries], parse_size(shard))
    try:
        for name, shape in entries:
            writer.write(name, rand(shape))
        writer.finish()
    finally:
        writer.abort()
    config.save_pretrained(tmp)
    tmp.rename(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=("8b", "1b"), default="8b")
    p.add_argument("--work", type=Path, default=ROOT / "bench-out" / "eight-b")
    p.add_argument("--recipe", default="top-half")
    p.add_argument("--sketch", type=int, help="alignment.sketch for the recipe (default: the recipe's own)")
    p.add_argument(
        "--solver", choices=("exact", "sinkhorn"), help="alignment.solver for the recipe (default: the recipe's own)"
    )
    p.add_argument(
        "--count", type=int, help="new layers (the recipe's count; default: its own, 50%%): fewer for a short run"
    )
    p.add_argument("--device", default="cpu", help="passed to upscale: cpu | cuda | cuda:N")
    p.add_argument("--memory-budget", help="passed to upscale (e.g. 4GB: layers built in order, the lower peak)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    copy, out = args.work / "cp-copy", args.work / "out"
    started = time.perf_counter()
    if args.shapes == "8b":
        base = args.work / "llama-8b-shape"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from benchmarks.eight_b import write_checkpoint, LLAMA_8B; "
                f"from pathlib import Path; write_checkpoint(Path({str(base)!r}), LLAMA_8B)",
            ],
            check=True,
            cwd=ROOT,
        )
    else:
        from benchmarks.io_bench import LLAMA_1B, make_checkpoint

        base = make_checkpoint(ROOT / "bench-out" / "llama-1b-shape", LLAMA_1B)
    built = time.perf_counter() - started
    recipe = args.recipe
    if args.sketch or args.solver or args.count:
        import yaml

        from opt_deus_cli.recipe import shipped_recipes

        data = yaml.safe_load(Path(shipped_recipes().get(recipe, recipe)).read_text())
        if args.sketch:
            data.setdefault("alignment", {})["sketch"] = args.sketch
        if args.solver:
            data.setdefault("alignment", {})["solver"] = args.solver
        if args.count:
            data["count"] = args.count
        recipe = str(args.work / "recipe.yaml")
        Path(recipe).write_text(yaml.safe_dump(data))
    load = [os.getloadavg()[0]]
    shutil.rmtree(copy, ignore_errors=True)
    cp = measure(["cp", "-r", str(base), str(copy)])
    shutil.rmtree(copy)
    shutil.rmtree(out, ignore_errors=True)
    budget = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    up = measure(
        opt_deus_command(
            "upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", args.device, "--json", *budget
        )
    )
    load.append(os.getloadavg()[0])
    manifest = json.loads((out / "opt-deus-manifest.json").read_text())
    new = [layer for layer in manifest["layers"] if layer["origin"] == "new"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "checkpoint_seconds": round(built, 1),
        "input_gb": round(dir_bytes(base) / 1e9, 2),
        "output_gb": round(dir_bytes(out) / 1e9, 2),
        "layers": f"{manifest['base']['num_layers']} -> {manifest['output']['num_layers']}",
        "recipe": manifest["recipe"],
        "device": manifest["resolved"]["device"],
        "memory_budget": args.memory_budget,
        "cp": cp,
        "upscale": up,
        "load_avg": load,
        "overlapped": sorted({layer["report"]["mlp"].get("overlapped") for layer in new}, key=str),
        "new_layer_seconds": [layer["seconds"] for layer in new],
        "new_layer_groups": [
            {g: round(layer["report"][g]["seconds"], 2) for g in ("attention", "mlp")} for layer in new
        ],
        "timings": manifest["timings"],
        "warnings": manifest["warnings"],
    }
    if not args.keep:
        shutil.rmtree(out)
        if args.shapes == "8b":  # 16 GB; the 1B-shape checkpoint is io_bench's, kept
            shutil.rmtree(base)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    per_layer = result["new_layer_seconds"]
    print(
        f"{result['layers']} layers, {result['input_gb']} -> {result['output_gb']} GB: wall {up['seconds']} s, "
        f"CPU {up['cpu_seconds']} s, peak RSS {up.get('own_peak_rss_mb')} MB (with its children {up['peak_rss_mb']} MB; "
        f"the process tree's peak PSS {up.get('peak_tree_pss_mb')} MB); "
        f"cp -r {cp['seconds']} s; "
        f"new layers {min(per_layer):.1f}-{max(per_layer):.1f} s (mean {sum(per_layer) / len(per_layer):.1f}); load {load}"
    )


if __name__ == "__main__":
    main()
