"""OpT-DeUS on mixtures of experts (canonical blocks, as methods see them): self-fusion, a planted
permutation of experts, router rows and neurons, and end-to-end function preservation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (
    EXACT,
    MOE_FAMILIES,
    SHARP_SINKHORN,
    SINKHORN,
    assert_blocks_close,
    check_report,
    load_model,
    logits,
    planted_permutation,
)
from opt_deus_cli.architectures import ATTENTION_ROLES, MLP_ROLES, SUPPORTED, HeadLayout
from opt_deus_cli.errors import UsageError
from opt_deus_cli.job import Options
from opt_deus_cli.methods.base import BuildContext, Fusion
from opt_deus_cli.methods.opt_deus import OptDeusMethod
from opt_deus_cli.methods.opt_deus.matrices import alignment_matrices
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import upscale

MOE = MOE_FAMILIES
LAYOUT = HeadLayout(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate=24, num_experts=4)


def ctx(family: str) -> BuildContext:
    return BuildContext(SUPPORTED[family].canonical(), LAYOUT, torch.device("cpu"))


def random_moe_block(family: str, seed: int, dtype=torch.float32) -> dict:
    """A canonical mixture-of-experts block: attention, E experts, router (E, hidden), norms."""
    arch = SUPPORTED[family].canonical()
    g = torch.Generator().manual_seed(seed)
    block = {arch.weight(r): 0.1 * torch.randn(LAYOUT.weight_shape(r), generator=g) for r in ATTENTION_ROLES}
    for role in MLP_ROLES:
        for e in range(LAYOUT.num_experts):
            block[arch.experts[role].format(e=e) + ".weight"] = 0.1 * torch.randn(
                LAYOUT.weight_shape(role), generator=g
            )
    block[arch.router] = 0.1 * torch.randn(LAYOUT.num_experts, LAYOUT.hidden, generator=g)
    for name in arch.norms:
        block[name] = 1 + 0.3 * torch.randn(LAYOUT.hidden, generator=g)
    for name in arch.head_norms:
        block[name] = 1 + 0.3 * torch.randn(LAYOUT.head_dim, generator=g)
    return {n: t.to(dtype) for n, t in block.items()}


def planted_expert_permutation(block: dict, family: str, seed: int) -> dict:
    """An allowed re-ordering: attention as in the dense test, experts permuted with their router
    rows, and the neurons inside each expert permuted across gate/up rows and down columns."""
    arch = SUPPORTED[family].canonical()
    out = planted_permutation(block, "llama", seed, LAYOUT)  # attention names are LLaMA's
    g = torch.Generator().manual_seed(seed + 1)
    experts = torch.randperm(LAYOUT.num_experts, generator=g)  # new expert b is old expert experts[b]
    assert not torch.equal(experts, torch.arange(LAYOUT.num_experts))
    for b in range(LAYOUT.num_experts):
        neurons = torch.randperm(LAYOUT.intermediate, generator=g)
        for role in MLP_ROLES:
            new, old = (arch.experts[role].format(e=e) + ".weight" for e in (b, int(experts[b])))
            out[new] = block[old].index_select(1 if role == "down" else 0, neurons)
    out[arch.router] = block[arch.router][experts]
    return out


def check_moe_report(report: dict) -> None:
    check_report(report)
    for key in ("solver", "iterations", "converged", "cost_before", "cost_after", "permutation_likeness", "seconds"):
        assert key in report["experts"], key
    assert report["mlp"]["plans"] >= LAYOUT.num_experts


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("settings", [EXACT, SINKHORN], ids=["exact", "sinkhorn"])
def test_self_fusion_returns_the_moe_block(family, settings):
    block = random_moe_block(family, seed=1)
    new, report = OptDeusMethod(settings).build(block, {n: t.clone() for n, t in block.items()}, ctx(family))
    atol = 0.0 if settings.solver == "exact" else 1e-5
    assert_blocks_close(new, block, atol=atol, rtol=1e-6 if atol else 0.0)
    check_moe_report(report)
    assert report["experts"]["cost_after"] <= 1e-6 and report["experts"]["permutation_likeness"] > 0.99
    assert report["mlp"]["converged"] and report["mlp"]["cost_after"] <= 1e-4
    assert report["mlp"]["plans"] == LAYOUT.num_experts  # the negligible expert pairs are dropped
    assert report["notes"] == []


@pytest.mark.parametrize("family", MOE)
def test_planted_expert_permutation_is_recovered_exactly(family):
    lower = random_moe_block(family, seed=3)
    upper = planted_expert_permutation(lower, family, seed=4)
    new, report = OptDeusMethod(EXACT).build(lower, upper, ctx(family))
    assert_blocks_close(new, upper, atol=0.0)  # 0.5 * B + 0.5 * B, bit for bit
    assert report["experts"]["cost_before"] > 0.01 and report["experts"]["cost_after"] < 1e-9
    assert report["mlp"]["cost_before"] > 0.1 and report["mlp"]["cost_after"] < 1e-6
    check_moe_report(report)


def test_planted_expert_permutation_is_recovered_by_sinkhorn():
    lower = random_moe_block("qwen3_moe", seed=5, dtype=torch.bfloat16)
    upper = planted_expert_permutation(lower, "qwen3_moe", seed=6)
    new, report = OptDeusMethod(SHARP_SINKHORN).build(lower, upper, ctx("qwen3_moe"))
    assert_blocks_close(new, upper, atol=1e-6, rtol=2**-8)  # at most one bf16 rounding step
    assert report["experts"]["converged"] and report["mlp"]["converged"]


def test_unrelated_experts_fuse_with_alpha():
    """alpha = 0 gives B; otherwise every expert and router row of the new layer moves off B's."""
    lower, upper = random_moe_block("mixtral", seed=7), random_moe_block("mixtral", seed=8)
    new, _ = OptDeusMethod(EXACT, Fusion(alpha=0.0)).build(lower, upper, ctx("mixtral"))
    assert_blocks_close(new, upper, atol=0.0)
    new, report = OptDeusMethod(EXACT).build(lower, upper, ctx("mixtral"))
    router = SUPPORTED["mixtral"].canonical().router
    assert (new[router] - upper[router]).abs().amax(1).min() > 1e-3
    assert report["experts"]["cost_after"] <= report["experts"]["cost_before"]


def test_expert_alignment_matrices():
    lower = random_moe_block("qwen3_moe", seed=9)
    upper = planted_expert_permutation(lower, "qwen3_moe", seed=10)
    E, I = LAYOUT.num_experts, LAYOUT.intermediate
    got = alignment_matrices(lower, upper, ctx("qwen3_moe"), EXACT, "mlp")
    assert got["cost"].shape == got["plan"].shape == (E, E)
    assert (got["plan"] > 0).sum() == E and float((got["plan"] * got["cost"]).sum()) < 1e-9
    assert len(got["expert_pairs"]) == E
    for pair in got["expert_pairs"].values():
        assert pair["cost"].shape == pair["plan"].shape == (I, I)
    json.dumps(got["report"], allow_nan=False)
    att = alignment_matrices(lower, upper, ctx("qwen3_moe"), EXACT, "attention")
    assert att["cost"].shape == (LAYOUT.num_heads, LAYOUT.num_heads)


def test_reference_mode_refuses_experts():
    block = random_moe_block("mixtral", seed=11)
    with pytest.raises(UsageError, match="no rule for mixture-of-experts"):
        OptDeusMethod(AlignmentSettings(mode="reference")).build(block, dict(block), ctx("mixtral"))


@pytest.mark.parametrize("family", MOE)
def test_upscale_moe_preserves_function(model_factory, tmp_path, family):
    base = model_factory(family, layers=4)
    recipe = parse_recipe({"method": "opt-deus", "positions": "top", "count": 2})
    manifest = upscale(base, recipe, tmp_path / "o", Options(device="cpu", shard_size="60KB")).to_dict()
    assert manifest["function_preserving"] and not manifest["warnings"]
    entry = manifest["layers"][manifest["new_layers"][0]]
    assert len([z for z in entry["zeroed"] if "experts" in z]) == 4  # every expert's down projection
    assert entry["report"]["experts"]["cost_after"] <= entry["report"]["experts"]["cost_before"]
    torch.testing.assert_close(logits(load_model(tmp_path / "o")), logits(load_model(base)), rtol=0, atol=0)


def test_upscale_moe_reference_mode_fails_before_writing(model_factory, tmp_path):
    recipe = parse_recipe({"method": "opt-deus", "positions": "top", "count": 2, "alignment": {"mode": "reference"}})
    with pytest.raises(UsageError, match="mode: corrected"):
        upscale(model_factory("mixtral", layers=4), recipe, tmp_path / "o", Options(device="cpu"))
    assert not (tmp_path / "o").exists()
