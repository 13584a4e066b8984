"""LLaMA-Pro block expansion (a new layer is a copy of its lower neighbour) and SOLAR depth
up-scaling (the repeated layers of the second slice are plain copies).

The recipe's `copy:` block makes two ablations of the same idea expressible as recipes:
- `neighbour: upper`: the new layer between k and k+1 is a copy of k+1, not of k. Which neighbour
  a new layer starts from is one of the two things OpT-DeUS changes (its fused layer is mostly the
  upper one when alpha < 1), alignment being the other;
- `scale: s`: the projection weights (and their biases) of the copy are multiplied by s; norms and
  a mixture of experts' router are copied unchanged. `neighbour: upper, scale: 0.5` is what the
  published OpT-DeUS semantics produce when their transport plans underflow (docs/method.md
  section 1: q/k/v/gate/up = 0.5 W_B, o/down zeroed), up to their norms, which that mode averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..architectures import PROJECTION_ROLES
from ..settings import check_settings, setting
from .base import Block, BuildContext, Method

NEIGHBOURS = ("lower", "upper")


@dataclass(frozen=True)
class CopySettings:
    """The recipe's `copy:` block."""

    neighbour: str = setting("lower", choices=NEIGHBOURS, doc="copy base layer k (LLaMA-Pro) or k+1")
    scale: float = setting(1.0, minimum=0.0, doc="factor on the projection weights and biases (norms unchanged)")

    def __post_init__(self):
        check_settings(self)


class CopyMethod(Method):
    name = "copy"
    supports_experts = True  # tensor names do not matter to a copy
    default_zero_init: ClassVar[tuple[str, ...]] = ("o_proj", "down_proj")
    settings = {"copy": CopySettings}

    def __init__(self, copy: CopySettings = CopySettings()):
        self.copy = copy

    @property
    def needs_upper(self) -> bool:  # type: ignore[override]  # (a ClassVar in Method) an upper copy is built from k+1, so it needs a layer above k
        return self.copy.neighbour == "upper"

    @property
    def copies_lower(self) -> bool:  # type: ignore[override]  # (a ClassVar in Method) the pipeline then copies bytes instead of calling build()
        return self.copy.neighbour == "lower" and self.copy.scale == 1.0

    def composition(self, sources: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
        return ((sources[-1] if self.needs_upper else sources[0], 1.0),)  # a copy of one layer

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        source = upper if self.needs_upper else lower
        assert source is not None, "the layer plan gives an upper copy both neighbours"
        if self.copy.scale == 1.0:
            return {n: t.clone() for n, t in source.items()}, {}
        scaled = {n for role in PROJECTION_ROLES for n in ctx.arch.role_tensors(role, ctx.layout)}
        # scaled in float32 and stored in the source dtype (or --dtype), as every computed tensor is
        return {
            n: ctx.result(t.float() * self.copy.scale, t) if n in scaled else t.clone() for n, t in source.items()
        }, {}


class StackMethod(CopyMethod):
    name = "stack"
    placement = "slices"
    default_zero_init = ()
    settings = {}  # plain copies of whole slices: no `copy:` block
