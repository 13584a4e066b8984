"""Reference mode (the published script's rules) outside LLaMA-shaped blocks: the rule written for
LLaMA's post_attention_layernorm belongs to the norm that feeds the MLP, which in Gemma is
pre_feedforward_layernorm, and Gemma stores a norm's scale as 1 + w. A Gemma block whose weights
mean what a LLaMA block's mean must come out meaning the same."""

from __future__ import annotations

import torch

from conftest import LAYOUT, ctx, random_block
from opt_deus_cli.methods.base import Fusion
from opt_deus_cli.methods.opt_deus import OptDeusMethod
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings, ReferenceSolver

REFERENCE = OptDeusMethod(
    AlignmentSettings(mode="reference"), Fusion(alpha=0.5), reference_solver=ReferenceSolver(max_iter=200)
)


def as_gemma(block: dict, seed: int) -> dict:
    """The LLaMA block's projections, its MLP norm as Gemma's pre-feedforward norm (1 + w
    convention), and Gemma's two extra norms (random)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in block.items() if "layernorm" not in k}
    out["input_layernorm.weight"] = block["input_layernorm.weight"] - 1
    out["pre_feedforward_layernorm.weight"] = block["post_attention_layernorm.weight"] - 1
    out["post_attention_layernorm.weight"] = 0.3 * torch.randn(LAYOUT.hidden, generator=g)
    out["post_feedforward_layernorm.weight"] = 0.3 * torch.randn(LAYOUT.hidden, generator=g)
    return out


def test_gemma_mlp_norm_gets_the_published_rule_on_its_scale():
    lower, upper = random_block("llama", seed=31), random_block("llama", seed=32)
    llama, _ = REFERENCE.build(lower, upper, ctx("llama"))
    glower, gupper = as_gemma(lower, 1), as_gemma(upper, 2)
    gemma, _ = REFERENCE.build(glower, gupper, ctx("gemma2"))
    # the same projections and the same effective norms: the same fused block
    for name in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"):
        torch.testing.assert_close(gemma[name], llama[name])
    torch.testing.assert_close(gemma["pre_feedforward_layernorm.weight"] + 1, llama["post_attention_layernorm.weight"])
    torch.testing.assert_close(gemma["input_layernorm.weight"] + 1, llama["input_layernorm.weight"])
    # the published rule moved the MLP norm (T_o mixes residual dims): not a plain average
    plain = 0.5 * (glower["pre_feedforward_layernorm.weight"] + gupper["pre_feedforward_layernorm.weight"])
    assert (gemma["pre_feedforward_layernorm.weight"] - plain).abs().max() > 1e-3
    # Gemma's other norms have no published rule: averaged
    for name in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"):
        torch.testing.assert_close(gemma[name], 0.5 * (glower[name] + gupper[name]))
