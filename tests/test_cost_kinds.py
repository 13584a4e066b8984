"""One switch over cost kinds (issue 19): ot.cost_kind says what each kind computes, and every
cost of the package (matrices, paired units, a KV group's parts, the experts' proxy) follows it:
the paired forms equal the diagonal of the cost matrix of the concatenated features, for every kind."""

from __future__ import annotations

import pytest
import torch

from opt_deus_cli.architectures import MLP_ROLES, SUPPORTED, HeadLayout
from opt_deus_cli.block import BuildContext
from opt_deus_cli.errors import OptDeusError
from opt_deus_cli.methods.opt_deus.attention import stacked_parts_cost
from opt_deus_cli.methods.opt_deus.experts import expert_cost
from opt_deus_cli.methods.opt_deus.mlp import matched_cost
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings
from opt_deus_cli.ot import cost_kind, cost_matrix, paired_cost
from opt_deus_cli.ot_names import COST_KINDS


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_every_offered_kind_is_known_and_nothing_else():
    """The recipe offers exactly the kinds the dispatcher knows; an unknown one is one clear error."""
    for kind in COST_KINDS:
        AlignmentSettings(cost=kind)
        spec = cost_kind(kind)
        assert cost_kind(spec.squared).root is False and cost_kind(spec.squared).angular == spec.angular
    with pytest.raises(OptDeusError, match="unknown cost 'manhattan'; expected one of euclidean, sqeuclidean, cosine"):
        cost_kind("manhattan")
    with pytest.raises(OptDeusError, match="unknown cost"):
        paired_cost(lambda f: torch.zeros(3), "manhattan")


@pytest.mark.parametrize("kind", COST_KINDS)
def test_paired_forms_equal_the_matrix_diagonal(kind):
    """paired_cost (through the MLP's matched_cost and attention's stacked_parts_cost, with
    broadcast parts) gives cost_matrix's entry for each pair, without building the matrix."""
    Xs, Ys = [rand(9, 5, seed=1), rand(9, 3, seed=2)], [rand(9, 5, seed=3), rand(9, 3, seed=4)]
    X, Y = torch.cat(Xs, 1), torch.cat(Ys, 1)
    full = cost_matrix(X, Y, kind)  # (9, 9) float64
    match = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    got = matched_cost([x.float() for x in Xs], [y.float() for y in Ys], match, kind, torch.device("cpu"))
    torch.testing.assert_close(got.double(), full[torch.arange(9), match], atol=1e-5, rtol=1e-5)
    # attention's units: a shared part (broadcast over the units) and per-unit parts
    shared = rand(1, 2, 4, seed=6)
    x = {"q": rand(9, 2, 4, seed=7), "o": shared}
    y = {"q": rand(9, 2, 4, seed=8), "o": rand(9, 2, 4, seed=9)}
    flat_x = torch.cat([x["q"].flatten(1), shared.expand(9, 2, 4).flatten(1)], 1)
    flat_y = torch.cat([y["q"].flatten(1), y["o"].flatten(1)], 1)
    torch.testing.assert_close(
        stacked_parts_cost(x, y, kind), cost_matrix(flat_x, flat_y, kind).diagonal(), atol=1e-10, rtol=1e-10
    )


def moe_block(seed: int, scale: float = 1.0) -> dict:
    """The MLP side of a canonical mixtral block (4 experts, router); `scale` multiplies it all."""
    arch, layout = SUPPORTED["mixtral"].canonical(), MOE_LAYOUT
    block = {
        arch.experts[role].format(e=e) + ".weight": rand(*layout.weight_shape(role), seed=seed * 100 + 10 * e + i)
        for i, role in enumerate(MLP_ROLES)
        for e in range(layout.num_experts)
    }
    block[arch.router] = rand(layout.num_experts, layout.hidden, seed=seed * 100 + 99)
    return {name: scale * t.float() for name, t in block.items()}


MOE_LAYOUT = HeadLayout(hidden=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate=12, num_experts=4)


def test_expert_proxy_follows_the_kind():
    """The experts' sliced proxy: euclidean is the root of sqeuclidean, and cosine compares
    directions only (a layer scaled as a whole costs 0 against itself, expert for expert)."""
    ctx = BuildContext(SUPPORTED["mixtral"].canonical(), MOE_LAYOUT, torch.device("cpu"))
    a, b = moe_block(1), moe_block(2)
    sq, euclid = expert_cost(a, b, ctx, "sqeuclidean"), expert_cost(a, b, ctx, "euclidean")
    assert sq.shape == (4, 4) and bool((sq > 0).all())
    torch.testing.assert_close(euclid, sq.sqrt(), atol=0, rtol=0)
    scaled = expert_cost(a, moe_block(1, scale=3.0), ctx, "cosine")
    off_diagonal = scaled[~torch.eye(4, dtype=torch.bool)]
    assert float(scaled.diagonal().abs().max()) < 1e-6 and float(off_diagonal.min()) > 1e-3
    assert float(expert_cost(a, moe_block(1, scale=3.0), ctx, "sqeuclidean").diagonal().min()) > 1.0
