"""AVG-DeUS: the new layer is the element-wise mean of its two neighbours (no alignment)."""

from __future__ import annotations

from .base import Block, BuildContext, Fusion, Method, average_blocks


class AverageMethod(Method):
    name = "average"
    needs_upper = True
    supports_experts = True  # experts are averaged position by position, as AVG-DeUS does
    settings = {"fusion": Fusion}

    def __init__(self, fusion: Fusion = Fusion()):
        self.alpha = fusion.alpha

    def composition(self, sources: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
        return ((sources[0], self.alpha), (sources[1], 1.0 - self.alpha))

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        assert upper is not None
        return average_blocks(lower, upper, self.alpha, ctx), {}
