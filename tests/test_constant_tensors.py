"""Tensors set to one value (zero-init; a Gemma-style post-norm set to -1) are written as that
value's bytes in the tensor's dtype, without a tensor in memory: the bytes torch would store."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from opt_deus_cli.checkpoint import TensorMeta
from opt_deus_cli.dtypes import dtype_code, value_bytes
from opt_deus_cli.shards import ShardWriter

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("value", [0.0, -1.0, 1.0, 0.1, 1 / 3, -2.5e-3, 1e-8, 300.7])
def test_value_bytes_are_what_torch_stores(dtype, value):
    want = torch.full((1,), value, dtype=dtype).view(torch.uint8).numpy().tobytes()
    assert value_bytes(dtype_code(dtype), value) == want


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.int8, torch.uint8))
def test_integer_values(dtype):
    for value in (0, 3) + ((-1,) if dtype != torch.uint8 else ()):
        assert (
            value_bytes(dtype_code(dtype), value)
            == torch.full((1,), value, dtype=dtype).view(torch.uint8).numpy().tobytes()
        )


def test_written_constants_read_back_and_hash(tmp_path):
    # sizes across the 4 MiB chunk: one element, a partial chunk, several chunks and a remainder
    entries = [
        ("a", TensorMeta(torch.bfloat16, (1,))),
        ("b", TensorMeta(torch.float32, (3, 5))),
        ("c", TensorMeta(torch.bfloat16, (1500, 1500))),
        ("d", TensorMeta(torch.float16, (7,))),
    ]
    values = {"a": -1.0, "b": 0.0, "c": -1.0, "d": 0.1}
    writer = ShardWriter(tmp_path, entries, 1 << 40)
    try:
        for name, meta in entries:
            writer.write_constant(name, meta, values[name])
        writer.finish()
    finally:
        writer.abort()
    got = load_file(tmp_path / "model.safetensors")
    for name, meta in entries:
        assert got[name].dtype == meta.dtype and tuple(got[name].shape) == meta.shape
        assert torch.equal(got[name], torch.full(meta.shape, values[name], dtype=meta.dtype)), name
    size, digest = writer.digests["model.safetensors"]
    data = (tmp_path / "model.safetensors").read_bytes()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
