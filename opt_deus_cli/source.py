"""The base model as opt-deus reads it: one object owns the checkpoint, its config, the family
(architecture) and the head layout, the checks that the tensors are what the config implies,
and reading blocks (whole decoder layers) with a small cache."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .architectures import Architecture, HeadLayout, architecture_for, expected_block_shapes
from .block import Block, BuildContext, Decisions
from .checkpoint import Checkpoint
from .configs import load_hf_config
from .errors import OptDeusError

if TYPE_CHECKING:
    import torch


@dataclass
class SourceModel:
    ckpt: Checkpoint
    hf_config: object  # the config through transformers (a PretrainedConfig)
    arch: Architecture
    layout: HeadLayout
    blocks: dict[int, list[str]]  # base layer -> its tensor names, relative to the block
    pre: list[str]  # non-block tensors before the blocks (embeddings)
    post: list[str]  # non-block tensors after them (final norm, lm_head)
    cache_size: int = 2
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def open(cls, model_dir: Path | str) -> SourceModel:
        """Read the metadata (config.json, safetensors headers) and check it; no weights yet."""
        ckpt = Checkpoint(model_dir)
        arch = architecture_for(ckpt.config)
        hf_config = load_hf_config(ckpt.dir)
        config = hf_config.to_dict()  # family defaults filled in, as transformers will load it
        layout = HeadLayout.from_config(config, arch)
        try:
            n = ckpt.config[arch.depth_key]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise OptDeusError(f"config.json has no valid {arch.depth_key}") from None
        source = cls(ckpt, hf_config, arch, layout, *_group_tensors(ckpt, arch, n))
        source._check_blocks()
        source._check_outer()
        return source

    @property
    def dir(self) -> Path:
        return self.ckpt.dir

    @property
    def config(self) -> dict:
        """The config as transformers reads it: every family default filled in."""
        return self.hf_config.to_dict()

    @property
    def raw_config(self) -> dict:
        """config.json as written (the key set the output keeps)."""
        return self.ckpt.config

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- reading ---------------------------------------------------------------------------
    def block(self, index: int) -> Block:
        """Base layer `index`'s tensors (relative names); the last cache_size blocks are kept,
        enough for the lower and upper neighbours of a new layer."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        while len(self._cache) >= self.cache_size:  # evicted before reading: never cache_size + 1 blocks
            self._cache.popitem(last=False)
        prefix = self.arch.layer_prefix(index)
        block = {rel: self.ckpt.read(prefix + rel) for rel in self.blocks[index]}
        self._cache[index] = block
        return block

    def canonical(self, block: Block | None) -> Block | None:
        """Methods see canonical blocks (LLaMA names, fused tensors split) whatever the family;
        arch.from_canonical gives the family's own names back."""
        return self.arch.to_canonical(block, self.layout) if block is not None else None

    def canonical_pair(
        self,
        sources: tuple[int, ...],
        device: torch.device,
        out_dtype: torch.dtype | None = None,
        decisions: Decisions = Decisions(),
    ) -> tuple[Block, Block | None, BuildContext]:
        """(lower, upper or None, context) of base layers (k,) or (k, k+1), canonical."""
        lower = self.canonical(self.block(sources[0]))
        upper = self.canonical(self.block(sources[1])) if len(sources) > 1 else None
        return (
            lower,
            upper,
            BuildContext(self.arch.canonical(), self.layout, device, tuple(sources), out_dtype, decisions),
        )

    def files(self) -> list[Path]:
        return self.ckpt.files()

    # ---- checks ----------------------------------------------------------------------------
    def _check_blocks(self) -> None:
        ckpt, arch, layout = self.ckpt, self.arch, self.layout
        expected = expected_block_shapes(arch, layout)
        reference = set(self.blocks[0]) if self.blocks else set()
        for i, names in self.blocks.items():
            have = set(names)
            for rel, shape in expected.items():
                full = arch.layer_prefix(i) + rel
                if rel not in have:
                    raise OptDeusError(f"tensor {full} is missing; the {arch.model_type} architecture needs it")
                got = ckpt.meta(full).shape
                if got != shape:
                    raise OptDeusError(f"tensor {full} has shape {list(got)} but config.json implies {list(shape)}")
            for role in arch.projections:
                bias = arch.bias(role)
                if bias in have and ckpt.meta(arch.layer_prefix(i) + bias).shape != (layout.weight_shape(role)[0],):
                    raise OptDeusError(f"tensor {arch.layer_prefix(i) + bias} has the wrong shape for its weight")
            if have != reference:
                raise OptDeusError(f"layer {i} has different tensors from layer 0: {sorted(have ^ reference)}")

    def _check_outer(self) -> None:
        """The tensors around the blocks, named alike in every supported family: without them the
        output would load with random embeddings or head (transformers initialises what is missing)."""
        config = self.config
        vocab = config.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
            raise OptDeusError(f"config.json has no valid vocab_size (got {vocab!r})")
        hidden = self.layout.hidden
        expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
        if not config.get("tie_word_embeddings", False):
            expected["lm_head.weight"] = (vocab, hidden)
        have = set(self.ckpt.names)
        for name, shape in expected.items():
            if name not in have:
                raise OptDeusError(f"tensor {name} is missing; the {config['model_type']} architecture needs it")
            got = self.ckpt.meta(name).shape
            if got != shape:
                raise OptDeusError(f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}")


def _group_tensors(ckpt: Checkpoint, arch: Architecture, n: int):
    blocks: dict[int, list[str]] = {i: [] for i in range(n)}
    pre, post = [], []
    for name in ckpt.names:
        split = arch.split_layer_name(name)
        if split is None:
            (pre if "embed" in name else post).append(name)
        elif split[0] >= n:
            raise OptDeusError(f"checkpoint has tensor {name} but config.json says {arch.depth_key} = {n}")
        else:
            blocks[split[0]].append(split[1])
    for i in blocks:
        blocks[i].sort()
    return blocks, sorted(pre), sorted(post)


def check_finite(
    block: Block, prefix: str, what: str, fix: str = "fix the checkpoint or pass --allow-nonfinite"
) -> None:
    import torch

    for rel, t in block.items():
        # min and max are finite iff every entry is (NaN propagates through both); one cheap pass
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            raise OptDeusError(f"{what} tensor {prefix}{rel} contains NaN or Inf; {fix}")
