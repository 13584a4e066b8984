"""What every layer-building method is. A method describes itself (name, where its layers go,
its settings, what it can build) and builds one new block from the tensors of its source base
layers. Reading, zero-init, dtype and writing are the pipeline's job.

Imports no torch at module level: the recipe parser reads these descriptions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..settings import check_settings, setting

if TYPE_CHECKING:
    import torch

    from ..architectures import Architecture, HeadLayout

Block = dict  # tensor name relative to the block prefix -> torch.Tensor
Progress = Callable[[str, int, int], None]  # (description, done, total)


@dataclass(frozen=True)
class BuildContext:
    arch: "Architecture"
    layout: "HeadLayout"
    device: "torch.device"
    sources: tuple[int, ...] = ()  # base indices of the layers being fused (lower first)
    out_dtype: "torch.dtype | None" = None  # --dtype of the output; None: each tensor keeps its source dtype

    def result(self, t, like):
        """A computed tensor as the pipeline wants it: CPU, contiguous, in the dtype it will be
        stored in (so a float32 output keeps the float32 computation, not a bf16 rounding of it)."""
        dtype = self.out_dtype if self.out_dtype is not None and like.is_floating_point() else like.dtype
        return t.to(device="cpu", dtype=dtype).contiguous()


@dataclass(frozen=True)
class Fusion:
    """`fusion:` of a recipe: new = alpha * (lower, aligned if the method aligns) + (1 - alpha) * upper."""

    alpha: float = setting(0.5, minimum=0.0, maximum=1.0, doc="weight of the (aligned) lower layer")

    def __post_init__(self):
        check_settings(self)


class Method(ABC):
    """A way of building new layers. Subclasses set the class attributes and implement build()."""

    name: ClassVar[str]
    # "positions": a new layer after base layer k, built from k and k+1 (needs_upper) or from k
    # alone (it may then also follow the top layer); "slices": the output is ranges of base layers.
    # needs_upper and copies_lower are read from an instance: a method may derive them from its settings
    placement: ClassVar[str] = "positions"
    needs_upper: ClassVar[bool] = True
    default_zero_init: ClassVar[tuple[str, ...]] = ()  # used when the recipe names none
    supports_experts: ClassVar[bool] = False  # build() handles mixture-of-experts blocks
    # build() needs finite source tensors (it aligns or learns from them): --allow-nonfinite cannot help
    needs_finite: ClassVar[bool] = False
    # True: a new layer is its lower source byte for byte (but zeroed tensors), so the pipeline
    # copies the bytes file to file instead of calling build()
    copies_lower: ClassVar[bool] = False
    # build() needs working memory beyond the layer it writes, checked against --memory-budget
    guards_memory: ClassVar[bool] = False
    # recipe key -> settings dataclass; the recipe's block under that key becomes the keyword
    # argument of the same name of __init__
    settings: ClassVar[dict[str, type]] = {}

    def check(self, job) -> None:
        """Cheap refusals from metadata alone (family, depth, settings), before any weight is read:
        runs when the job is resolved, so --dry-run and `opt-deus recipes MODEL` see them too."""

    def prepare(self, job, progress: Progress | None = None) -> list[str]:
        """Runs once before any layer is written: refuse what build() would refuse, or learn from
        the whole stack (LESA; it may read any base tensor through job.source, a job.Job). Returns warnings
        for the user (said once per run, not once per layer)."""
        return []

    @abstractmethod
    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        """Return the new block (same names, shapes and dtypes as the sources) and a report
        (JSON-serialisable figures for the manifest; {} when there is nothing to say)."""

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "Method":
        return cls(**settings)
