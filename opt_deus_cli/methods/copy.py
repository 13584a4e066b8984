"""LLaMA-Pro block expansion (a new layer is a copy of its lower neighbour) and SOLAR depth
up-scaling (the repeated layers of the second slice are plain copies)."""

from __future__ import annotations

from .base import Block, BuildContext, Method


class CopyMethod(Method):
    name = "copy"
    needs_upper = False
    copies_lower = True
    supports_experts = True  # tensor names do not matter to a copy
    default_zero_init = ("o_proj", "down_proj")

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        return {n: t.clone() for n, t in lower.items()}, {}


class StackMethod(CopyMethod):
    name = "stack"
    placement = "slices"
    default_zero_init = ()
