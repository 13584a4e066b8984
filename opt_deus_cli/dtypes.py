"""The safetensors dtype codes, what torch calls them, their sizes, and one value's bytes in a
dtype. No torch at import: reading config.json, sizes and headers, and writing a tensor whose
every element is one value (zero-init) need none."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .errors import OptDeusError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPE_CODES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
CODE_OF_NAME = {name: code for code, (name, _) in DTYPE_CODES.items()}


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPE_CODES[code][0])


def dtype_code(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "BF16", the safetensors spelling."""
    return CODE_OF_NAME[str(dtype).removeprefix("torch.")]


def value_bytes(code: str, value: float) -> bytes:
    """One element of value `value` in dtype `code`, little-endian, as torch would store
    torch.full(..., value, dtype) (bfloat16: float32 rounded to nearest even, as torch does)."""
    if value == 0:  # +0.0 is all zero bits in every dtype
        return bytes(DTYPE_CODES[code][1])
    if code in ("F64", "F32", "F16"):
        return struct.pack({"F64": "<d", "F32": "<f", "F16": "<e"}[code], value)
    if code == "BF16":
        bits = struct.unpack("<I", struct.pack("<f", value))[0]
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to_bytes(2, "little")
    if code.startswith(("I", "U")) and float(value).is_integer():
        return int(value).to_bytes(DTYPE_CODES[code][1], "little", signed=code.startswith("I"))
    raise OptDeusError(f"cannot write the constant {value!r} in dtype {code}")
