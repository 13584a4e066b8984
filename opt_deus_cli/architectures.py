"""Model families described as data: the tensors of one decoder block, the head layout, and
the config keys that depend on depth.

Tensor names inside a block are relative to the block's prefix, e.g. for LLaMA the lower
layer's query weight `model.layers.7.self_attn.q_proj.weight` is `self_attn.q_proj.weight`.
Weights are stored (out, in) as in Hugging Face checkpoints: rows are output neurons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import OptDeusError

# The roles of a block's linear maps. The method code speaks only of roles; the family says
# which module implements each one.
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
PROJECTION_ROLES = ATTENTION_ROLES + MLP_ROLES
# Roles whose output is added to the residual stream: zeroing them makes a block an identity.
RESIDUAL_WRITERS = ("o", "down")


# The module path of each role in a LLaMA block: the canonical block every method sees.
CANONICAL_PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
CANONICAL_EXPERT = "mlp.experts.{e}.{role}_proj"  # canonical path of an expert's projection
CANONICAL_ROUTER = "mlp.router.weight"  # (experts, hidden): one row per expert


@dataclass(frozen=True)
class Architecture:
    model_type: str
    # role -> module path inside a block; weight is `<path>.weight`, optional bias `<path>.bias`
    projections: dict[str, str] = field(default_factory=lambda: dict(CANONICAL_PROJECTIONS))
    # fused module path -> the roles stacked along its rows (Phi-3: qkv_proj = [q; k; v])
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # mixture of experts: role -> module path with {e} for the expert index, and the router
    experts: dict[str, str] = field(default_factory=dict)
    router: str | None = None
    num_experts_keys: tuple[str, ...] = ()  # config keys that may hold the expert count
    expert_intermediate_key: str = "intermediate_size"
    # the experts as transformers >= 5 stores them: stacked parameters, relative to the block
    # (what a trainer of the loaded model sees; the checkpoint keeps one tensor per expert)
    stacked_experts: tuple[str, ...] = ()
    # residual-width norms (hidden,), averaged by the fusing methods
    norms: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    # the norm whose input is the residual stream feeding the MLP (LLaMA: post_attention_layernorm;
    # Gemma's post_attention_layernorm normalises the attention output, pre_feedforward feeds the MLP)
    mlp_input_norm: str = "post_attention_layernorm.weight"
    # a norm's scale is norm_offset + weight (Gemma stores 1 + w: RMSNorm multiplies by (1 + weight))
    norm_offset: float = 0.0
    # residual writer role -> the norm that normalises its branch output before the residual add
    # (Gemma 2/3: o -> post_attention_layernorm, down -> post_feedforward_layernorm). A zeroed
    # projection in front of such a norm trains badly (the norm's derivative at 0 is 1/sqrt(eps)),
    # so the function-preserving start sets this norm's scale to 0 instead (docs/method.md section 7)
    post_norms: dict[str, str] = field(default_factory=dict)
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

    @staticmethod
    def projection_short_name(role: str) -> str:
        """`o_proj` for role `o`: the name users write in a recipe's `zero_init`."""
        return CANONICAL_PROJECTIONS[role].rsplit(".", 1)[-1]

    def role_of_short_name(self, short: str) -> str | None:
        """The role a recipe name means: the canonical `down_proj`, or the family's own (`w2`)."""
        for role in PROJECTION_ROLES:
            own = self.projections.get(role) or self.experts.get(role) or ""
            if short in (self.projection_short_name(role), own.rsplit(".", 1)[-1]):
                return role
        return None

    def zeroable(self, role: str) -> bool:
        return role in self.projections or role in self.experts

    @property
    def zero_scale_weight(self) -> float:
        """The stored norm weight whose scale (norm_offset + weight) is 0: -1 for Gemma's 1 + w."""
        return -self.norm_offset

    def start_tensors(self, role: str, layout: HeadLayout) -> dict[str, float]:
        """What makes a residual branch start at zero: tensor name -> the value it is set to. The
        branch's post-norm at scale 0 where the family has one (the projection kept as built),
        else the projection's weights and biases (all experts) at 0."""
        if role in self.post_norms:
            return {self.post_norms[role]: self.zero_scale_weight}
        return {name: 0.0 for name in self.role_tensors(role, layout)}

    def role_tensors(self, role: str, layout: HeadLayout) -> list[str]:
        """Every tensor name implementing a role (weights and possible biases; all experts)."""
        if role in self.projections:
            return [self.weight(role), self.bias(role)]
        if role in self.experts:
            paths = [self.experts[role].format(e=e) for e in range(layout.num_experts)]
            return [p + suffix for p in paths for suffix in (".weight", ".bias")]
        return []

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}{index}."

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        """`model.layers.7.mlp.up_proj.weight` -> (7, `mlp.up_proj.weight`); None if not a block tensor."""
        m = re.match(re.escape(self.layers_prefix) + r"(\d+)\.(.+)$", name)
        return (int(m.group(1)), m.group(2)) if m else None

    # ---- canonical blocks: what methods see ----------------------------------------------
    def canonical(self) -> Architecture:
        """The same family with LLaMA's names: fused tensors split, experts renamed."""
        experts = {r: CANONICAL_EXPERT.format(e="{e}", role=r) for r in self.experts}
        projections = {r: p for r, p in CANONICAL_PROJECTIONS.items() if r not in self.experts}
        return replace(
            self, projections=projections, fused={}, experts=experts, router=CANONICAL_ROUTER if self.router else None
        )

    def _renames(self, layout: HeadLayout) -> dict[str, str]:
        """own name -> canonical name, for tensors that are only renamed."""
        canon = self.canonical()
        pairs = {}
        for role, path in self.projections.items():
            pairs.update({path + s: canon.projections[role] + s for s in (".weight", ".bias")})
        for role, path in self.experts.items():
            for e in range(layout.num_experts):
                pairs.update({path.format(e=e) + s: canon.experts[role].format(e=e) + s for s in (".weight", ".bias")})
        if self.router:
            pairs[self.router] = CANONICAL_ROUTER
        return pairs

    def to_canonical(self, block: dict, layout: HeadLayout) -> dict:
        """A block under canonical names; fused weights (and biases) split by the head layout."""
        renames = self._renames(layout)
        out = {renames.get(name, name): t for name, t in block.items() if not self._is_fused(name)}
        for path, roles in self.fused.items():
            sizes = [layout.weight_shape(r)[0] for r in roles]
            for suffix in (".weight", ".bias"):
                if path + suffix in block:
                    for role, part in zip(roles, block[path + suffix].split(sizes, dim=0)):
                        out[CANONICAL_PROJECTIONS[role] + suffix] = part
        return out

    def from_canonical(self, block: dict, layout: HeadLayout) -> dict:
        """The inverse of to_canonical: own names, fused tensors joined again."""
        import torch

        back = {c: own for own, c in self._renames(layout).items()}
        fused_parts = {
            CANONICAL_PROJECTIONS[r] + s for roles in self.fused.values() for r in roles for s in (".weight", ".bias")
        }
        out = {back.get(name, name): t for name, t in block.items() if name not in fused_parts}
        for path, roles in self.fused.items():
            for suffix in (".weight", ".bias"):
                parts = [block.get(CANONICAL_PROJECTIONS[r] + suffix) for r in roles]
                if all(p is not None for p in parts):
                    out[path + suffix] = torch.cat(parts, dim=0)
        return out

    def _is_fused(self, name: str) -> bool:
        return any(name in (p + ".weight", p + ".bias") for p in self.fused)


_GEMMA_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)
_GEMMA_MLP_NORM = dict(
    mlp_input_norm="pre_feedforward_layernorm.weight",
    norm_offset=1.0,
    post_norms={"o": "post_attention_layernorm.weight", "down": "post_feedforward_layernorm.weight"},
)

SUPPORTED: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral"),
    "qwen2": Architecture("qwen2", window_layers_key="max_window_layers"),
    "qwen3": Architecture(
        "qwen3",
        head_norms=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        window_layers_key="max_window_layers",
    ),
    # Gemma 2/3: four norms per block; each branch output is normalised (scale 1 + w) before the
    # residual add, so a branch starts at zero by its post-norm's scale, not by o/down
    "gemma2": Architecture("gemma2", norms=_GEMMA_NORMS, **_GEMMA_MLP_NORM),
    "gemma3_text": Architecture(
        "gemma3_text",
        norms=_GEMMA_NORMS,
        **_GEMMA_MLP_NORM,
        head_norms=("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    ),
    # Phi-3: q, k, v fused in one weight, gate and up in another
    "phi3": Architecture(
        "phi3",
        projections={"o": "self_attn.o_proj", "down": "mlp.down_proj"},
        fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
    ),
    "mixtral": Architecture(
        "mixtral",
        projections={r: CANONICAL_PROJECTIONS[r] for r in ATTENTION_ROLES},
        experts={
            "gate": "block_sparse_moe.experts.{e}.w1",
            "up": "block_sparse_moe.experts.{e}.w3",
            "down": "block_sparse_moe.experts.{e}.w2",
        },
        router="block_sparse_moe.gate.weight",
        num_experts_keys=("num_local_experts",),
        stacked_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),  # transformers 5 renamed the block
    ),
    "qwen3_moe": Architecture(
        "qwen3_moe",
        projections={r: CANONICAL_PROJECTIONS[r] for r in ATTENTION_ROLES},
        experts={r: f"mlp.experts.{{e}}.{r}_proj" for r in MLP_ROLES},
        router="mlp.gate.weight",
        num_experts_keys=("num_experts", "num_local_experts"),  # hub configs; transformers 5 saves the second
        stacked_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        expert_intermediate_key="moe_intermediate_size",
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
            "(module path of each projection, fused tensors, experts, norm names, per-layer config keys)"
        )
    arch = SUPPORTED[model_type]
    if model_type == "qwen3_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise OptDeusError("qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) is not supported yet")
    return arch


@dataclass(frozen=True)
class HeadLayout:
    """Sizes of one block, read from config.json."""

    hidden: int
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads G (GQA groups); H % G == 0
    head_dim: int
    intermediate: int  # of the MLP, or of each expert in a mixture of experts
    num_experts: int = 0  # 0: a dense MLP

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: dict, arch: Architecture | None = None) -> HeadLayout:
        def positive(key: str, default=None) -> int:
            value = config.get(key) or default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptDeusError(f"config.json: {key} must be a positive whole number, got {config.get(key)!r}")
            return value

        hidden, heads = positive("hidden_size"), positive("num_attention_heads")
        kv = positive("num_key_value_heads", heads)
        head_dim = positive("head_dim", hidden // heads)
        moe = arch is not None and bool(arch.num_experts_keys)
        inter = positive(arch.expert_intermediate_key if moe else "intermediate_size")
        experts = 0
        if moe:
            key = next((k for k in arch.num_experts_keys if k in config), arch.num_experts_keys[0])
            experts = positive(key)
        if heads % kv:
            raise OptDeusError(
                f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )
        return cls(hidden, heads, kv, head_dim, inter, experts)

    def random_allowed_permutation(self, generator) -> dict[str, tuple]:
        """A random re-ordering that one inserted layer may undergo without changing what it
        computes (docs/method.md section 2): KV groups, query heads within a group, value dims within a
        KV head (the o_proj columns of all its query heads follow), MLP neurons shared by gate/up
        rows and down columns. role -> (dim, index) for index_select; biases follow their rows.
        Used to plant permutations that the alignment must recover."""
        import torch

        G, r, d = self.num_kv_heads, self.heads_per_group, self.head_dim
        groups = torch.randperm(G, generator=generator)  # new group b is old group groups[b]
        heads = [torch.randperm(r, generator=generator) for _ in range(G)]
        vdims = [torch.randperm(d, generator=generator) for _ in range(G)]
        ar = torch.arange(d)
        q_rows = torch.cat([(groups[b] * r + heads[b][j]) * d + ar for b in range(G) for j in range(r)])
        k_rows = torch.cat([groups[b] * d + ar for b in range(G)])
        v_rows = torch.cat([groups[b] * d + vdims[b] for b in range(G)])
        o_cols = torch.cat([(groups[b] * r + heads[b][j]) * d + vdims[b] for b in range(G) for j in range(r)])
        neurons = torch.randperm(self.intermediate, generator=generator)
        return {
            "q": (0, q_rows),
            "k": (0, k_rows),
            "v": (0, v_rows),
            "o": (1, o_cols),
            "gate": (0, neurons),
            "up": (0, neurons),
            "down": (1, neurons),
        }

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
    shapes: dict[str, tuple[int, ...]] = {arch.weight(r): layout.weight_shape(r) for r in arch.projections}
    for path, roles in arch.fused.items():
        shapes[path + ".weight"] = (sum(layout.weight_shape(r)[0] for r in roles), layout.hidden)
    for role, path in arch.experts.items():
        shapes.update({path.format(e=e) + ".weight": layout.weight_shape(role) for e in range(layout.num_experts)})
    if arch.router:
        shapes[arch.router] = (layout.num_experts, layout.hidden)
    shapes.update({n: (layout.hidden,) for n in arch.norms})
    shapes.update({n: (layout.head_dim,) for n in arch.head_norms})
    return shapes
