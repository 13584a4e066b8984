"""What the user asked of an up-scaling beside the recipe (device, dtype, shard size, overwrite,
memory budget, extra files), and the checks of its spelling: light, so that a usage error is
refused before the job's modules, torch or transformers are imported."""

from __future__ import annotations

from dataclasses import dataclass

from .devices import check_device, dtype_name
from .errors import OptDeusError, UsageError
from .shards import parse_size


@dataclass(frozen=True)
class Options:
    device: str = "auto"
    dtype: str = "keep"
    shard_size: str = "5GB"
    overwrite: bool = False
    allow_nonfinite: bool = False
    memory_budget: str | None = None  # "4GB": refuse a job whose layers would need more (None: the free RAM)
    copy_extra: tuple[str, ...] = ()  # globs of base files to copy beyond the model's own (--copy-extra)

    def check(self) -> None:
        """The values' spelling, refused before any model is read (and before torch is imported)."""
        check_device(self.device)
        dtype_name(self.dtype)
        parse_size(self.shard_size)
        memory_budget_bytes(self.memory_budget)


def memory_budget_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except OptDeusError:
        raise UsageError(f"--memory-budget {text!r} not understood; write e.g. 4GB, 500MB or 16GiB") from None
