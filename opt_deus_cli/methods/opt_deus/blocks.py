"""Block-level pieces both modes share: the input check, the float32 mix, the averaged rest."""

from __future__ import annotations

import torch

from ...architectures import Architecture, HeadLayout, expected_block_shapes
from ...errors import OptDeusError
from ...ot import all_finite
from ..base import Block, BuildContext, average_blocks

F32 = torch.float32


def check_blocks(lower: Block, upper: Block, arch: Architecture, layout: HeadLayout) -> None:
    """Both blocks have the same tensors, with the shapes the config implies, all finite."""
    if lower.keys() != upper.keys():
        raise OptDeusError(f"the two source layers have different tensors: {sorted(lower.keys() ^ upper.keys())}")
    expected = expected_block_shapes(arch, layout)
    for role in arch.projections:
        expected[arch.bias(role)] = (layout.weight_shape(role)[0],)
    for role, path in arch.experts.items():
        expected.update(
            {path.format(e=e) + ".bias": (layout.weight_shape(role)[0],) for e in range(layout.num_experts)}
        )
    for name, t in upper.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise OptDeusError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        if lower[name].shape != t.shape:
            raise OptDeusError(f"tensor {name}: shapes differ between the source layers")
    missing = [n for n in expected_block_shapes(arch, layout) if n not in upper]
    if missing:
        raise OptDeusError(f"source layers lack {', '.join(missing)}; is the model_type right?")
    for which, block in (("lower", lower), ("upper", upper)):
        for name, t in block.items():
            if not all_finite(t):
                raise OptDeusError(f"{which} source layer: tensor {name} contains NaN or Inf")


def mix(alpha: float, aligned: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return alpha * aligned + (1.0 - alpha) * b


def _known_names(arch: Architecture, layout: HeadLayout) -> set[str]:
    names = {p + s for p in arch.projections.values() for s in (".weight", ".bias")}
    names |= {n for role in arch.experts for n in arch.role_tensors(role, layout)}
    names |= {arch.router} if arch.router else set()
    return names | set(arch.norms) | set(arch.head_norms)


def average_rest(lower: Block, upper: Block, done: Block, ctx: BuildContext, alpha: float, notes: list[str]) -> Block:
    """Norms, head norms and o_proj's bias are averaged: the residual dimension is not
    transported. Anything unknown is averaged too, and said so."""
    rest = [n for n in upper if n not in done]
    known = _known_names(ctx.arch, ctx.layout)
    for name in rest:
        if name not in known:
            notes.append(f"{name}: no alignment rule for this tensor; averaged")
    return average_blocks({n: lower[n] for n in rest}, {n: upper[n] for n in rest}, alpha, ctx)
