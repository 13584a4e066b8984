"""What every layer-building method is. A method describes itself (name, where its layers go,
its settings, what it can build) and builds one new block from the tensors of its source base
layers. Reading, zero-init, dtype and writing are the pipeline's job. Also here: the plain
average of two blocks, which fusing methods share (a method never imports another method).

Imports no torch at module level: the recipe parser reads these descriptions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..block import Block as Block  # re-exported
from ..block import BuildContext as BuildContext
from ..block import Decisions as Decisions
from ..block import OutputLayer
from ..errors import OptDeusError
from ..settings import check_settings, setting

if TYPE_CHECKING:
    import torch

    from ..source import SourceModel

Progress = Callable[[str, int, int], None]  # (description, done, total)


class RecipeName(Protocol):
    @property
    def source(self) -> str: ...  # the recipe's name or file, for messages


class JobView(Protocol):
    """The resolved job as a method reads it in check() and prepare(); job.Job is one (methods/
    cannot import job.py, which imports them). Everything else a method needs comes in its
    settings or, in build(), in the BuildContext."""

    @property
    def source(self) -> SourceModel: ...  # the base model: family, layout, tensors
    @property
    def recipe(self) -> RecipeName: ...
    @property
    def layers(self) -> Sequence[OutputLayer]: ...  # every output layer, where it comes from
    @property
    def base_layers(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype | None: ...  # the output's floating dtype; None keeps each tensor's own
    @property
    def device(self) -> torch.device: ...
    @property
    def memory_budget(self) -> int | None: ...  # bytes a new layer may use; None: what is free


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

    def check(self, job: JobView) -> Decisions:
        """Cheap refusals from metadata alone (family, depth, settings), before any weight is read:
        runs when the job is resolved, so --dry-run and `opt-deus recipes MODEL` see them too.
        Returns what it decided for this job; the pipeline passes that to build() in the context."""
        return Decisions()

    def prepare(self, job: JobView, progress: Progress | None = None) -> list[str]:
        """Runs once before any layer is written: refuse what build() would refuse, or learn from
        the whole stack (LESA; it may read any base tensor through job.source). Returns warnings
        for the user (said once per run, not once per layer)."""
        return []

    def composition(self, sources: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
        """What a new layer read from `sources` (k, or k and k + 1) is built from: (base layer,
        weight) pairs. The manifest lists these layers, and the new layer takes the per-layer
        config of the heaviest (ties to the upper). Default: every source, evenly."""
        return tuple((j, 1.0 / len(sources)) for j in sources)

    @abstractmethod
    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        """Return the new block (same names, shapes and dtypes as the sources) and a report
        (JSON-serialisable figures for the manifest; {} when there is nothing to say)."""

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Method:
        return cls(**settings)


def average_blocks(lower: Block, upper: Block, alpha: float, ctx: BuildContext) -> Block:
    """alpha * lower + (1 - alpha) * upper, tensor by tensor, computed in float32."""
    import torch

    if lower.keys() != upper.keys():
        raise OptDeusError(f"layers to average have different tensors: {sorted(lower.keys() ^ upper.keys())}")
    out = {}
    for name, a in lower.items():
        b = upper[name]
        mixed = alpha * a.to(ctx.device, torch.float32) + (1 - alpha) * b.to(ctx.device, torch.float32)
        out[name] = ctx.result(mixed, b)
    return out
