"""Wall time and peak RSS of `opt-deus upscale` next to `cp -r` of the same checkpoint, measured
in the same run (issue: streaming up-scaler core).

The checkpoint has LLaMA-3.2-1B shapes (hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 KV heads, vocab 128256, tied embeddings), random bf16 weights, saved by transformers in 1 GB
shards: about 3 GB. Each measured command runs as its own child process; its peak RSS comes
from the kernel's rusage of that child (os.wait4), so nothing of this script is counted.

    python -m benchmarks.io_bench [--work bench-out] [--recipes llama-pro solar] [--rounds 3] [--hub] [--json]

--hub also reads the same checkpoint from a Hugging Face cache layout (blobs named by their sha256,
hard-linked to the checkpoint's files), where opt-deus takes the base's checksums from the names.
Each round times `cp -r`, `cp -r && sync` (opt-deus fsyncs what it writes, so this is the copy
that ends in the same state) and the upscale, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
)


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


SELF_RSS = "peak RSS of the process itself, kB:"
CUDA_PEAK = "peak CUDA memory allocated by torch, bytes:"
IMPORTED = "heavy modules imported:"


def _report_peaks() -> None:
    """At exit of an opt_deus_command: the process's own peak RSS, and torch's peak CUDA
    allocation where the run used a GPU (not torch's cache, nor the CUDA context)."""
    import resource

    print(SELF_RSS, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    print(
        IMPORTED,
        ",".join(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "numpy"})),
        file=sys.stderr,
    )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print(
            CUDA_PEAK,
            max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())),
            file=sys.stderr,
        )


def opt_deus_command(*args: str) -> list[str]:
    """`opt-deus ARGS` run so that it reports its own peak RSS (and peak CUDA memory) on exit
    (measure() reads them): the kernel's figure for a child (os.wait4) is the largest of it and
    ITS children, and OpT-DeUS may solve an assignment in a forked child, which maps the parent's
    pages (shared, copy-on-write)."""
    code = (
        "import atexit, sys; from benchmarks.io_bench import _report_peaks; atexit.register(_report_peaks); "
        "from opt_deus_cli.cli import app; sys.argv[0] = 'opt-deus'; app()"
    )
    return [sys.executable, "-c", code, *args]


def _tree_pss_kb(root: int) -> int:
    """Proportional set size of root and its descendants, kB: shared pages (a fork's copy-on-write
    view of its parent) are split between the processes that map them, so the sum is the physical
    memory the tree holds, not the over-count of adding RSS figures."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(frontier)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def _sample_peak_pss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.2):
        peak[0] = max(peak[0], _tree_pss_kb(pid))


def measure(cmd: list[str]) -> dict:
    """Run cmd as a child; wall seconds, CPU seconds and peak RSS in MB: the kernel's (the largest
    of the child and its own children) and, for opt_deus_command, the process's own. Dirty pages
    of earlier commands are flushed first so one command's writeback does not slow the next."""
    os.sync()
    start = time.perf_counter()
    root = str(Path(__file__).resolve().parent.parent)  # opt_deus_command's child imports benchmarks.io_bench
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stop, peak_pss = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_peak_pss, args=(proc.pid, stop, peak_pss), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    row = {
        "command": " ".join(cmd),
        "seconds": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
    }
    row["peak_tree_pss_mb"] = round(peak_pss[0] / 1024, 1)  # sampled every 0.2 s: a lower bound
    own = [line for line in err.splitlines() if line.startswith(SELF_RSS)]
    if own:
        row["own_peak_rss_mb"] = round(int(own[-1].split(":")[1]) / 1024, 1)
    imported = [line for line in err.splitlines() if line.startswith(IMPORTED)]
    if imported:  # a copy recipe's goal: no torch (issue 24)
        row["imported"] = [m for m in imported[-1].split(":", 1)[1].strip().split(",") if m]
    cuda = [line for line in err.splitlines() if line.startswith(CUDA_PEAK)]
    if cuda:
        row["peak_cuda_allocated_mb"] = round(int(cuda[-1].split(":")[1]) / 2**20, 1)
    return row


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def hub_layout(base: Path, cache: Path) -> Path:
    """`base` laid out as huggingface_hub's cache holds a download: blobs named by the sha256 of
    the content for the weights (LFS) and by the git blob sha1 for the other files, relative
    links snapshots/<revision>/<file> -> ../../blobs/<name>. Blobs are hard links of base's
    files where the filesystem allows (no second copy of the weights). Returns the snapshot."""
    import hashlib

    from opt_deus_cli.hashing import sha256_file

    repo = cache / "models--bench--llama-1b-shape"
    snapshot = repo / "snapshots" / ("0" * 40)
    if snapshot.is_dir():
        return snapshot
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(base.iterdir()):
        if file.name.endswith(".safetensors"):
            name = sha256_file(file)
        else:
            data = file.read_bytes()
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / name
        if not blob.exists():
            try:
                os.link(file, blob)
            except OSError:
                shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-out"))
    parser.add_argument("--recipes", nargs="+", default=["llama-pro"])
    parser.add_argument("--rounds", type=int, default=3, help="cp -r and upscale alternately, this many times each")
    parser.add_argument("--hub", action="store_true", help="also read the checkpoint from a Hub cache layout")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(args.work / "llama-1b-shape", LLAMA_1B)
    sources = {"directory": base}
    if args.hub:
        sources["hub cache"] = hub_layout(base, args.work / "hub-cache")
    rows = []
    copy_dir, out = args.work / "cp-copy", args.work / "io-out"
    for recipe in args.recipes:
        for where, source in sources.items():
            load = [os.getloadavg()[0]]
            cps, synced, ups, splits = [], [], [], []
            for _ in range(args.rounds):  # interleaved: page cache and writeback drift during a run
                shutil.rmtree(copy_dir, ignore_errors=True)
                cps.append(measure(["cp", "-rL", str(source), str(copy_dir)]))
                shutil.rmtree(copy_dir)
                # opt-deus fsyncs every file it writes (an atomic result survives a crash): cp -r
                # followed by sync is the copy that ends in the same state
                synced.append(measure(["sh", "-c", f"cp -rL '{source}' '{copy_dir}' && sync"]))
                shutil.rmtree(copy_dir)
                shutil.rmtree(out, ignore_errors=True)
                ups.append(
                    measure(
                        opt_deus_command(
                            "upscale", str(source), "--recipe", recipe, "--out", str(out), "--device", "cpu"
                        )
                    )
                )
                manifest = json.loads((out / "opt-deus-manifest.json").read_text())
                splits.append(manifest["timings"])
            load.append(os.getloadavg()[0])
            cp_s, up_s = median([c["seconds"] for c in cps]), median([u["seconds"] for u in ups])
            sync_s = median([c["seconds"] for c in synced])
            rows.append(
                {
                    "recipe": recipe,
                    "source": where,
                    "layers": f"{manifest['base']['num_layers']} -> {manifest['output']['num_layers']}",
                    "input_gb": round(dir_bytes(base) / 1e9, 3),
                    "output_gb": round(dir_bytes(out) / 1e9, 3),
                    "cp_seconds": [c["seconds"] for c in cps],
                    "upscale_seconds": [u["seconds"] for u in ups],
                    "upscale_cpu_seconds": [u["cpu_seconds"] for u in ups],
                    "peak_rss_mb": max(u["peak_rss_mb"] for u in ups),
                    "imported": ups[-1].get("imported"),
                    "cp_sync_seconds": [c["seconds"] for c in synced],
                    "time_ratio_vs_cp": round(up_s / cp_s, 2),
                    "time_ratio_vs_cp_sync": round(up_s / sync_s, 2),
                    "load_avg": load,
                    # the job's own time and its split (median over the rounds), from the manifest
                    "timings": {k: round(median([t[k] for t in splits]), 2) for k in splits[0]},
                }
            )
            shutil.rmtree(out, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=2))
        return
    print(f"machine: {machine}")
    for r in rows:
        print(
            f"{r['recipe']} from a {r['source']} ({r['layers']}, {r['input_gb']} -> {r['output_gb']} GB): cp -r {r['cp_seconds']} s (with sync {r['cp_sync_seconds']} s), "
            f"upscale {r['upscale_seconds']} s (CPU {r['upscale_cpu_seconds']} s, peak {r['peak_rss_mb']} MB), "
            f"median ratio {r['time_ratio_vs_cp']} ({r['time_ratio_vs_cp_sync']} against cp -r && sync), load {r['load_avg']}; imported {r['imported']}; job split {r['timings']}"
        )


if __name__ == "__main__":
    main()
