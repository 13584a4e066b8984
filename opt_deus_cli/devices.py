"""--device and --dtype: what the user typed -> torch objects, with one-line errors."""

from __future__ import annotations

import re

import torch

from .errors import UsageError

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPE_SPELLINGS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec != "cpu" and not re.fullmatch(r"cuda(:\d+)?", spec):
        raise UsageError(f"--device {spec!r} not understood; use auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(spec)


def resolve_dtype(spec: str) -> torch.dtype | None:
    """None for "keep" (every tensor keeps its stored dtype); the usual short spellings
    (bf16, fp16, fp32) name the same dtypes, in any case."""
    name = DTYPE_SPELLINGS.get(spec.lower(), spec.lower())
    if name not in DTYPES:
        raise UsageError(f"--dtype {spec!r} not understood; use {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return DTYPES[name]
