"""--device and --dtype: what the user typed -> torch objects, with one-line errors. The spelling
is checked without torch (check_device, dtype_name), so a bad value is refused at once; torch
is imported only to resolve a good one."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("keep", "bfloat16", "float16", "float32")  # "keep": every tensor keeps its stored dtype
DTYPE_SPELLINGS = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def check_device(spec: str) -> str:
    """The spec if it is spelt right (auto, cpu, cuda, cuda:N); whether CUDA is there is
    resolve_device's question."""
    if spec not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", spec):
        raise UsageError(f"--device {spec!r} not understood; use auto, cpu, cuda or cuda:N")
    return spec


def resolve_device(spec: str) -> torch.device:
    import torch

    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(spec)


def dtype_name(spec: str) -> str | None:
    """The dtype's name (None for "keep"); the usual short spellings (bf16, fp16, fp32) name the
    same dtypes, in any case."""
    name = DTYPE_SPELLINGS.get(spec.lower(), spec.lower())
    if name not in DTYPES:
        raise UsageError(f"--dtype {spec!r} not understood; use {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return None if name == "keep" else name


def resolve_dtype(spec: str) -> torch.dtype | None:
    """None for "keep" (every tensor keeps its stored dtype), else the torch dtype."""
    name = dtype_name(spec)
    if name is None:
        return None
    import torch

    return getattr(torch, name)
