"""The resolved job: everything decided before a byte is written (source model, method, output
layers, zero-init, dtype, device), and what follows from it (tensor order, function preservation,
the names of the new layers' parameters)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .architectures import PROJECTION_ROLES, RESIDUAL_WRITERS
from .block import Decisions
from .checkpoint import TensorMeta
from .devices import resolve_device, resolve_dtype
from .errors import UsageError
from .layers import OutputLayer, recipe_layers
from .methods.base import Method
from .methods.registry import method_class
from .options import Options, memory_budget_bytes
from .recipe import Recipe
from .source import SourceModel

if TYPE_CHECKING:
    import torch


@dataclass
class Job:
    source: SourceModel
    recipe: Recipe
    method: Method
    layers: list[OutputLayer]
    zero_roles: tuple[str, ...]
    dtype: torch.dtype | None  # the output's floating dtype; None keeps each tensor's own
    device: torch.device
    memory_budget: int | None = None  # bytes a new layer may use (--memory-budget); None: what is free
    decisions: Decisions = field(default_factory=Decisions)  # what check() decided; every BuildContext carries it

    @property
    def base_layers(self) -> int:
        return self.source.depth

    @property
    def new_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.is_new]

    @property
    def function_preserving(self) -> bool:
        """New layers are identities (both residual writers zeroed) and the base layers are
        kept in their order, so the deeper model computes what the base computed."""
        kept = [layer.sources[0] for layer in self.layers if not layer.is_new]
        return set(RESIDUAL_WRITERS) <= set(self.zero_roles) and kept == list(range(self.base_layers))

    def out_dtype(self, meta: TensorMeta) -> torch.dtype:
        return self.dtype if self.dtype is not None and meta.dtype.is_floating_point else meta.dtype

    def entries(self) -> list[tuple[str, TensorMeta]]:
        """Every output tensor with its dtype and shape, in writing order."""
        src = self.source
        out = []
        for name in src.pre:
            meta = src.ckpt.meta(name)
            out.append((name, TensorMeta(self.out_dtype(meta), meta.shape)))
        for layer in self.layers:
            k = layer.sources[0]
            for rel in src.blocks[k]:
                meta = src.ckpt.meta(src.arch.layer_prefix(k) + rel)
                out.append((src.arch.layer_prefix(layer.index) + rel, TensorMeta(self.out_dtype(meta), meta.shape)))
        for name in src.post:
            meta = src.ckpt.meta(name)
            out.append((name, TensorMeta(self.out_dtype(meta), meta.shape)))
        return out

    def start_values(self, layer: OutputLayer) -> dict[str, float]:
        """The tensors set to a constant in a new layer so that its branches named by zero_init
        start at zero: relative name -> value (architectures.Architecture.start_tensors). A copied
        layer's are written as the value's bytes (ShardWriter.write_constant), a computed one's filled."""
        if not layer.is_new:
            return {}
        block = set(self.source.blocks[layer.sources[0]])
        arch, layout = self.source.arch, self.source.layout
        return {n: v for role in self.zero_roles for n, v in arch.start_tensors(role, layout).items() if n in block}

    def trainable_regex(self) -> str:
        """Matches exactly the parameter names of the new layers."""
        if not self.new_layers:
            return "(?!)"
        alternatives = "|".join(str(i) for i in self.new_layers)
        return "^" + re.escape(self.source.arch.layers_prefix) + f"(?:{alternatives})\\."

    def describe(self, with_layers: bool = True) -> dict:
        """The resolved job as plain data (for --dry-run and the manifest)."""
        plan = {
            "model_type": self.source.arch.model_type,
            "base_layers": self.base_layers,
            "output_layers": len(self.layers),
            "method": self.recipe.method,
            "new_layers": self.new_layers,
            "function_preserving": self.function_preserving,
            "zero_init": [self.source.arch.projection_short_name(r) for r in self.zero_roles],
            "device": str(self.device),
            "dtype": "keep" if self.dtype is None else str(self.dtype).removeprefix("torch."),
        }
        if with_layers:
            plan["layers"] = [
                {
                    "index": layer.index,
                    "origin": layer.origin,
                    "sources": list(layer.built_from),
                    "method": layer.method,
                }
                for layer in self.layers
            ]
        return plan


def resolve_job(source: SourceModel, recipe: Recipe, options: Options) -> Job:
    """Check the recipe against this model and resolve it: method, output layers, zero-init."""
    arch = source.arch
    method_cls = method_class(recipe.method)
    if arch.experts and not method_cls.supports_experts:
        raise UsageError(
            f"method {recipe.method} cannot build mixture-of-experts layers ({arch.model_type}) yet; "
            "use copy, average or stack"
        )
    if options.memory_budget is not None and not method_cls.guards_memory:
        raise UsageError(
            f"--memory-budget applies to method opt-deus (its cost matrices and solver); method "
            f"{recipe.method} writes each new layer from its sources with no more memory, so drop the option"
        )
    method = method_cls.from_settings(recipe.settings)
    zero_init = recipe.zero_init if recipe.zero_init is not None else method.default_zero_init
    zero_roles = []
    for short in zero_init:
        role = arch.role_of_short_name(short)
        if role is None:
            allowed = ", ".join(arch.projection_short_name(r) for r in PROJECTION_ROLES)
            raise UsageError(
                f"recipe {recipe.source}: zero_init names {short!r}, which is not a projection of {arch.model_type} ({allowed})"
            )
        if not arch.zeroable(role):
            raise UsageError(
                f"recipe {recipe.source}: {short} is fused with other projections in {arch.model_type}; it cannot be zeroed alone"
            )
        zero_roles.append(role)
    dtype = resolve_dtype(options.dtype)
    layers = recipe_layers(recipe, source.depth)
    job = Job(
        source,
        recipe,
        method,
        layers,
        tuple(zero_roles),
        dtype,
        resolve_device(options.device),
        memory_budget_bytes(options.memory_budget),
    )
    job.decisions = method.check(job)
    return job
