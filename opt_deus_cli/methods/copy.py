"""LLaMA-Pro block expansion: the new layer is a copy of its lower neighbour."""

from __future__ import annotations

from .base import Block, BuildContext


class CopyMethod:
    name = "copy"
    needs_upper = False
    # the new layer is its lower source byte for byte (but zeroed tensors): the pipeline copies
    # the bytes file to file instead of calling build()
    copies_lower = True
    supports_experts = True  # tensor names do not matter to a copy
    default_zero_init = ("o_proj", "down_proj")

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        return {n: t.clone() for n, t in lower.items()}, {}


class StackMethod(CopyMethod):
    """SOLAR depth up-scaling: the repeated layers of the second slice are plain copies."""

    name = "stack"
    default_zero_init: tuple[str, ...] = ()
