"""The base config through transformers, and config.json of the deeper model.

Reading: config.json as written (the user's key set, kept for the output) and the same file
through transformers' config class (`AutoConfig`, no remote code), so family defaults (gemma's
tie_word_embeddings) and derived per-layer attributes (layer_types from gemma2's parity,
gemma3's sliding_window_pattern, qwen2's use_sliding_window/max_window_layers) are what
transformers itself uses.

Writing: the base's config.json with the new depth and every per-layer attribute explicit for the
output layers (each one behaves like the base layer it inherits: base_position), checked
by reading the result back through the same config class."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from .architectures import Architecture
from .block import OutputLayer
from .errors import OptDeusError

if TYPE_CHECKING:
    import torch

# The first transformers release whose modeling code reads `config.layer_types` for gemma2,
# gemma3, qwen2 and qwen3 (4.52.4 still chose sliding/full by layer index: gemma2
# `layer_idx % 2`, gemma3 `(layer_idx + 1) % sliding_window_pattern`, qwen2/qwen3
# `layer_idx >= max_window_layers`; compared in both releases' modeling files).
LAYER_TYPES_SINCE = "4.53.0"
PER_LAYER = ("layer_types",)  # per-layer config attributes transformers derives when absent


def load_hf_config(model_dir: Path):
    """config.json through transformers' own config class (never remote code)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # e.g. "auto_map ignored": we never run remote code anyway
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; name the file and the reason, on one line
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        raise OptDeusError(
            f"transformers cannot read {Path(model_dir) / 'config.json'}: {reason}; fix the file "
            "or restore it from the model's source"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)


def per_layer(hf_config) -> dict[str, list]:
    """The per-layer attributes transformers uses for this config (explicit or derived)."""
    found = {}
    for key in PER_LAYER:
        value = getattr(hf_config, key, None)
        if isinstance(value, (list, tuple)):
            found[key] = list(value)
    return found


def base_position(layer: OutputLayer) -> int:
    """The base layer whose per-layer config (layer type, window, RoPE) an output layer inherits."""
    return layer.settings_from


def rewrite_config(
    raw: dict, hf_config, arch: Architecture, layers: list[OutputLayer], dtype: torch.dtype | None
) -> tuple[dict, list[str], list[str]]:
    """Return (new config.json, notes, warnings). `dtype` is the output's floating dtype when it
    was changed."""
    base_n = int(raw[arch.depth_key])
    out = copy.deepcopy(raw)
    out[arch.depth_key] = len(layers)
    notes, warnings = [], []
    inherit = [base_position(layer) for layer in layers]  # base layer each output layer behaves like
    base_lists = per_layer(hf_config)
    for key, value in base_lists.items():
        if len(value) != base_n:
            raise OptDeusError(f"config.json: {key} should list {base_n} entries (one per layer), has {value!r}")
        out[key] = [value[j] for j in inherit]
        notes += _fusion_choices(key, value, layers)
    if arch.window_layers_key and isinstance(raw.get(arch.window_layers_key), int):
        # transformers before LAYER_TYPES_SINCE reads this instead of layer_types: layers with
        # index >= max_window_layers use the sliding window; keep the same base layers on each side
        boundary = raw[arch.window_layers_key]
        out[arch.window_layers_key] = sum(1 for j in inherit if j < boundary) + max(0, boundary - base_n)
        notes.append(f"{arch.window_layers_key}: {boundary} -> {out[arch.window_layers_key]}")
    # any other top-level list as long as the base depth is probably per-layer: say so
    for key, value in raw.items():
        if isinstance(value, list) and len(value) == base_n and key not in base_lists and base_n > 2:
            notes.append(f"config key {key} has {base_n} entries and was left unchanged; check it is not per-layer")
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in out or (key == "dtype" and "torch_dtype" not in out):
                out[key] = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> bfloat16
    _check_reads_back(out, hf_config, {key: out[key] for key in base_lists})
    if base_lists and _derived(out, hf_config, base_lists) != {key: out[key] for key in base_lists}:
        warnings.append(
            f"the output lists its layer_types explicitly and they differ from the pattern transformers derives "
            f"from the layer index: load it with transformers >= {LAYER_TYPES_SINCE} (older versions ignore "
            "layer_types and would switch base layers between sliding and full attention)"
        )
    return out, notes, warnings


def _fusion_choices(key: str, base_values: list, layers: list[OutputLayer]) -> list[str]:
    """A note for each new layer built from base layers whose per-layer setting differs (a fusion
    of a sliding and a full layer): which one it took, and by what rule."""
    notes = []
    for layer in layers:
        if layer.is_new and len({repr(base_values[j]) for j in layer.built_from}) > 1:
            parts = ", ".join(f"base {j} {base_values[j]} (weight {w:g})" for j, w in layer.parts)
            notes.append(
                f"{key}: new layer {layer.index} is built from {parts}: it takes base "
                f"{layer.settings_from}'s, the larger weight (ties to the upper layer)"
            )
    return notes


def _check_reads_back(out: dict, hf_config, expected: dict[str, list]) -> None:
    """The written config, read by the same config class, has the depth and per-layer attributes we mean."""
    back = type(hf_config).from_dict(out)
    got = per_layer(back)
    if got != expected or back.num_hidden_layers != out["num_hidden_layers"]:
        raise OptDeusError(f"the deeper config does not read back as written ({expected} vs {got}); please report this")


def _derived(out: dict, hf_config, keys) -> dict[str, list]:
    """What transformers derives for the new depth when the per-layer lists are left out."""
    return per_layer(type(hf_config).from_dict({k: v for k, v in out.items() if k not in keys}))
