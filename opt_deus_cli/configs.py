"""config.json of the deeper model: depth and every per-layer setting follow the output layers."""

from __future__ import annotations

import copy

import torch

from .architectures import Architecture
from .devices import DTYPE_NAMES
from .errors import OptDeusError
from .layers import OutputLayer, base_position


def rewrite_config(config: dict, arch: Architecture, layers: list[OutputLayer], dtype: torch.dtype | None) -> tuple[dict, list[str]]:
    """Return (new config, notes). `dtype` is the output's floating dtype when it was changed."""
    base_n = int(config[arch.depth_key])
    out = copy.deepcopy(config)
    out[arch.depth_key] = len(layers)
    notes = []
    inherit = [base_position(layer) for layer in layers]  # base layer each output layer behaves like
    for key in arch.per_layer_lists:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != base_n:
            raise OptDeusError(f"config.json: {key} should list {base_n} entries (one per layer), has {value!r}")
        out[key] = [value[j] for j in inherit]
    if arch.window_layers_key and isinstance(config.get(arch.window_layers_key), int):
        # layers with index >= max_window_layers use the sliding window: keep the same base
        # layers on each side of the boundary
        boundary = config[arch.window_layers_key]
        out[arch.window_layers_key] = sum(1 for j in inherit if j < boundary) + max(0, boundary - base_n)
        notes.append(f"{arch.window_layers_key}: {boundary} -> {out[arch.window_layers_key]}")
    # any other top-level list as long as the base depth is probably per-layer: say so
    for key, value in config.items():
        if isinstance(value, list) and len(value) == base_n and key not in arch.per_layer_lists and base_n > 2:
            notes.append(f"config key {key} has {base_n} entries and was left unchanged; check it is not per-layer")
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in out or (key == "dtype" and "torch_dtype" not in out):
                out[key] = DTYPE_NAMES[dtype]
    return out, notes
