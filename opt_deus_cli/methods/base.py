"""What every layer-building method is: given the tensors of its source base layers, return the
tensors of one new block. Reading, zero-init, dtype and writing are the pipeline's job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..architectures import Architecture, HeadLayout

Block = dict[str, torch.Tensor]  # tensor name relative to the block prefix -> tensor


@dataclass(frozen=True)
class BuildContext:
    arch: Architecture
    layout: HeadLayout
    device: torch.device
    sources: tuple[int, ...] = ()  # base indices of the layers being fused (lower first)


class Method(Protocol):
    name: str
    # True: a new layer sits between base layers k and k+1 and is built from both;
    # False: it is built from layer k alone (it may then also follow the top layer).
    needs_upper: bool
    # zero_init used when the recipe names none
    default_zero_init: tuple[str, ...]

    # Optional: `supports_experts = True` when build() handles mixture-of-experts blocks.
    # Optional: `prepare(job, progress)` runs once before any layer is written, for methods that
    # learn from the whole stack (LESA); it may read any base tensor through job.ckpt.

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        """Return the new block (same names, shapes and dtypes as the sources) and a report
        (JSON-serialisable figures for the manifest; {} when there is nothing to say)."""
        ...
