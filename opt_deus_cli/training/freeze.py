"""Which parameters train: the manifest's `trainable_layers` (the new layers) and nothing else.

`freeze_base(model, model_dir)` is the whole contract a training script needs: it reads the
manifest beside the weights, checks that the model in memory is the one the manifest describes
(same depth), sets `requires_grad` on every parameter and returns the names left trainable.
Parameters are named as the model in memory names them; a wrapper's prefix
(`base_model.model.` from PEFT, `_orig_mod.` from torch.compile) is allowed before the family's
`model.layers.<i>.`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..architectures import SUPPORTED, Architecture
from ..errors import OptDeusError
from ..manifest import Manifest, read_manifest


def manifest_architecture(manifest: Manifest) -> Architecture:
    model_type = manifest.base.model_type
    if model_type not in SUPPORTED:
        raise OptDeusError(f"the manifest names model_type {model_type!r}, which this opt-deus does not know")
    return SUPPORTED[model_type]


def layer_pattern(arch: Architecture) -> re.Pattern:
    """`model.layers.<i>.` at the start of a name or after a wrapper's prefix; group 1 is i."""
    return re.compile(r"(?:^|\.)" + re.escape(arch.layers_prefix) + r"(\d+)\.")


def layer_of(name: str, pattern: re.Pattern) -> int | None:
    found = pattern.search(name)
    return int(found.group(1)) if found else None


def is_trainable(name: str, layers: set[int], pattern: re.Pattern) -> bool:
    """A tensor of one of `layers`; everything outside the decoder blocks (embeddings, final
    norm, head) belongs to the base."""
    return layer_of(name, pattern) in layers


def frozen_rule(manifest: Manifest) -> Callable[[str], bool]:
    """is_frozen(tensor name): a tensor outside the manifest's trainable layers (what `--train new`
    keeps bit-identical)."""
    layers, pattern = set(manifest.trainable_layers), layer_pattern(manifest_architecture(manifest))
    return lambda name: not is_trainable(name, layers, pattern)


def freeze_base(model, model_dir: Path | str) -> list[str]:
    """Freeze every parameter except those of the manifest's trainable layers; return the names
    of the trainable ones, in the model's order.

    Raises OptDeusError when model_dir has no manifest, when the model's depth differs from the
    manifest's output depth (another checkpoint was loaded), or when no parameter matches."""
    manifest = read_manifest(model_dir, required=True)
    arch = manifest_architecture(manifest)
    depth = getattr(getattr(model, "config", None), arch.depth_key, None)
    expected = manifest.output.num_layers
    if depth != expected:
        raise OptDeusError(
            f"the model has {depth} layers ({arch.depth_key}) but the manifest in {model_dir} "
            f"describes {expected}; load the checkpoint of that directory"
        )
    layers = set(manifest.trainable_layers)
    if not layers:
        raise OptDeusError(f"the manifest in {model_dir} lists no trainable layers; train the whole model instead")
    pattern = layer_pattern(arch)
    trainable = []
    seen_layers = set()
    for name, parameter in model.named_parameters():
        index = layer_of(name, pattern)
        if index is not None:
            seen_layers.add(index)
        parameter.requires_grad_(index in layers)
        if index in layers:
            trainable.append(name)
    missing = sorted(layers - seen_layers)
    if not trainable or missing:
        for _, parameter in model.named_parameters():  # leave no half-frozen model behind
            parameter.requires_grad_(True)
        what = "no parameter" if not trainable else f"no parameter of layers {missing}"
        raise OptDeusError(
            f"{what} matches {arch.layers_prefix}<i>. for the trainable layers "
            f"{sorted(layers)} of the manifest in {model_dir}; is this a {arch.model_type} model?"
        )
    return trainable
