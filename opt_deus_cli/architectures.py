"""Model families described as data: the tensors of one decoder block, the head layout, and
the config keys that depend on depth.

Tensor names inside a block are relative to the block's prefix, e.g. for LLaMA the lower
layer's query weight `model.layers.7.self_attn.q_proj.weight` is `self_attn.q_proj.weight`.
Weights are stored (out, in) as in Hugging Face checkpoints: rows are output neurons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import OptDeusError

# The roles of a block's linear maps. The method code speaks only of roles; the family says
# which module implements each one.
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
PROJECTION_ROLES = ATTENTION_ROLES + MLP_ROLES
# Roles whose output is added to the residual stream: zeroing them makes a block an identity.
RESIDUAL_WRITERS = ("o", "down")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    # role -> module path inside a block; weight is `<path>.weight`, optional bias `<path>.bias`
    projections: dict[str, str] = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )
    # residual-width norms (hidden,), averaged by the fusing methods
    norms: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    # per-head norms (head_dim,) applied to q and k (Qwen3); averaged, never permuted
    head_norms: tuple[str, ...] = ()
    layers_prefix: str = "model.layers."
    depth_key: str = "num_hidden_layers"
    # config lists with one entry per layer; rewritten to follow the output layers
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    # config int: layers with index >= this use sliding-window attention (Qwen2/Qwen3)
    window_layers_key: str | None = None

    def weight(self, role: str) -> str:
        return self.projections[role] + ".weight"

    def bias(self, role: str) -> str:
        return self.projections[role] + ".bias"

    def projection_short_name(self, role: str) -> str:
        """`o_proj` for role `o`: the name users write in a recipe's `zero_init`."""
        return self.projections[role].rsplit(".", 1)[-1]

    def role_of_short_name(self, short: str) -> str | None:
        for role in PROJECTION_ROLES:
            if self.projection_short_name(role) == short:
                return role
        return None

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}{index}."

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        """`model.layers.7.mlp.up_proj.weight` -> (7, `mlp.up_proj.weight`); None if not a block tensor."""
        m = re.match(re.escape(self.layers_prefix) + r"(\d+)\.(.+)$", name)
        return (int(m.group(1)), m.group(2)) if m else None


SUPPORTED: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral"),
    "qwen2": Architecture("qwen2", window_layers_key="max_window_layers"),
    "qwen3": Architecture(
        "qwen3",
        head_norms=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        window_layers_key="max_window_layers",
    ),
}


def architecture_for(config: dict) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise OptDeusError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(SUPPORTED))}. "
            "A new family is one Architecture entry in opt_deus_cli/architectures.py "
            "(module path of each projection, norm names, per-layer config keys)"
        )
    return SUPPORTED[model_type]


@dataclass(frozen=True)
class HeadLayout:
    """Sizes of one block, read from config.json."""

    hidden: int
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads G (GQA groups); H % G == 0
    head_dim: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: dict) -> "HeadLayout":
        def positive(key: str, default=None) -> int:
            value = config.get(key) or default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptDeusError(f"config.json: {key} must be a positive whole number, got {config.get(key)!r}")
            return value

        hidden, heads = positive("hidden_size"), positive("num_attention_heads")
        kv = positive("num_key_value_heads", heads)
        head_dim = positive("head_dim", hidden // heads)
        inter = positive("intermediate_size")
        if heads % kv:
            raise OptDeusError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        return cls(hidden, heads, kv, head_dim, inter)

    def weight_shape(self, role: str) -> tuple[int, int]:
        """(out, in) of a projection's weight."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q": (q_out, self.hidden),
            "k": (kv_out, self.hidden),
            "v": (kv_out, self.hidden),
            "o": (self.hidden, q_out),
            "gate": (self.intermediate, self.hidden),
            "up": (self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }[role]


def expected_block_shapes(arch: Architecture, layout: HeadLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor a block of this family must have, with its shape (biases are optional and
    checked separately: their shape is (out,) of their weight)."""
    shapes: dict[str, tuple[int, ...]] = {arch.weight(r): layout.weight_shape(r) for r in PROJECTION_ROLES}
    shapes.update({n: (layout.hidden,) for n in arch.norms})
    shapes.update({n: (layout.head_dim,) for n in arch.head_norms})
    return shapes
