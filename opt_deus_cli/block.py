"""What building one layer involves, below the methods: a block (one decoder layer's tensors),
where an output layer comes from, and the context a method builds a new block in (with what its
check() decided for the job). The base
model's reader (source.py) hands blocks over and the planner (layers.py) lists output layers
with these types; methods/ builds with them. Imports no torch at module level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .architectures import Architecture, HeadLayout

Block = dict  # tensor name relative to the block prefix -> torch.Tensor


@dataclass(frozen=True)
class OutputLayer:
    index: int  # output layer index
    origin: str  # "base" (first use of a base layer) or "new"
    sources: tuple[int, ...]  # base layers read to build it: k (and k + 1), lower first
    method: str  # "base" for kept layers; the recipe's method for new ones
    # (base layer, weight) of what it is built from (Method.composition): a copy lists its one
    # source, a fusion both with alpha and 1 - alpha; empty: every source, evenly
    composition: tuple[tuple[int, float], ...] = ()

    @property
    def is_new(self) -> bool:
        return self.origin == "new"

    @property
    def parts(self) -> tuple[tuple[int, float], ...]:
        return self.composition or tuple((j, 1.0 / len(self.sources)) for j in self.sources)

    @property
    def built_from(self) -> tuple[int, ...]:
        """The base layers it is built from (an upper copy: k + 1 alone), as the records list them."""
        return tuple(j for j, _ in self.parts)

    @property
    def settings_from(self) -> int:
        """The base layer whose per-layer config (layer type, window, RoPE base) it takes: its
        source of largest weight, ties to the upper one, whose output the new layer's input is
        (docs/method.md section 6)."""
        return max(self.parts, key=lambda part: (part[1], part[0]))[0]


@dataclass(frozen=True)
class Decisions:
    """What a method's check() decided for a job from its metadata. The pipeline hands it to
    build() in every BuildContext: a method keeps no state between the two calls."""

    # independent work inside one layer may run side by side (OpT-DeUS: a dense MLP's assignment
    # solved in a child process beside attention); False: in order, at the lower memory peak
    overlap: bool = True


@dataclass(frozen=True)
class BuildContext:
    arch: Architecture
    layout: HeadLayout
    device: torch.device
    sources: tuple[int, ...] = ()  # base indices of the layers being fused (lower first)
    out_dtype: torch.dtype | None = None  # --dtype of the output; None: each tensor keeps its source dtype
    decisions: Decisions = Decisions()  # what the method's check() decided for this job

    def result(self, t, like):
        """A computed tensor as the pipeline wants it: CPU, contiguous, in the dtype it will be
        stored in (so a float32 output keeps the float32 computation, not a bf16 rounding of it)."""
        dtype = self.out_dtype if self.out_dtype is not None and like.is_floating_point() else like.dtype
        return t.to(device="cpu", dtype=dtype).contiguous()
