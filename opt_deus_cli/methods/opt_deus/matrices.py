"""The inspection path: cost matrices and plans of one group of one new layer, recomputed with
the same functions the build uses (CPU tensors; rows = A's units in their original order,
columns = B's)."""

from __future__ import annotations

import torch

from ...errors import OptDeusError
from ..base import Block, BuildContext
from .attention import align_attention
from .blocks import check_blocks
from .experts import align_expert_neurons, align_experts
from .mlp import MlpAlignment, align_mlp_cost, mlp_cost
from .reference import group_report, reference_pass
from .settings import PUBLISHED, AlignmentSettings, ReferenceSolver, refuse_reference_experts


def alignment_matrices(
    lower: Block,
    upper: Block,
    ctx: BuildContext,
    settings: AlignmentSettings,
    group: str,
    reference_solver: ReferenceSolver = PUBLISHED,
) -> dict:
    """Cost matrices and plans of one group, for inspection.

    corrected, "attention": cost/plan (H, H) between query heads (cost of head (a, i) vs (b, j)
    with the (a, b) value-dim map applied; plan = group plan x head plan), group_cost/group_plan
    (G, G) between KV groups, v_cost/v_plan (G*d, G*d) between value dims likewise.
    corrected, "mlp": cost/plan (I, I) between MLP neurons; on a mixture of experts, cost/plan
    (E, E) between experts (the sliced proxy cost, see experts.expert_cost) and "expert_pairs":
    {(a, b): {cost, plan}} (I, I) between the neurons of every pair of experts the fusion uses.
    reference: cost/plan of q_proj (attention) or gate_proj (mlp), and "tensors": {name: {cost, plan}}
    for every tensor of the group. Every answer also has "report": the group's figures.
    """
    if group not in ("attention", "mlp"):
        raise OptDeusError(f"unknown alignment group {group!r}; expected attention or mlp")
    refuse_reference_experts(settings, ctx.arch)
    check_blocks(lower, upper, ctx.arch, ctx.layout)
    if settings.mode == "reference":
        return _reference(lower, upper, ctx, group, reference_solver)
    if group == "mlp" and ctx.arch.experts:
        return _experts(lower, upper, ctx, settings)
    if group == "mlp":
        cost = mlp_cost(lower, upper, ctx, settings)
        al = align_mlp_cost(cost, settings)
        return {"cost": cost.cpu(), "plan": al.solved.map.plan(), "report": al.figures}
    return _attention(lower, upper, ctx, settings)


def _attention(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings) -> dict:
    al = align_attention(lower, upper, ctx, settings)
    G, r, d = ctx.layout.num_kv_heads, ctx.layout.heads_per_group, ctx.layout.head_dim
    TG = al.group.map.plan()

    def compose(size: int, pick) -> tuple[torch.Tensor, torch.Tensor]:
        # (G*size, G*size) with block (a, b) = that pair's inner cost, and plan T_G[a, b] * T_inner
        cost = torch.zeros(G, size, G, size, dtype=torch.float64)
        plan = torch.zeros_like(cost)
        for (a, b), pair in al.pairs.items():
            inner_cost, inner = pick(pair)
            cost[a, :, b, :] = inner_cost.cpu().double()
            plan[a, :, b, :] = TG[a, b] * inner.map.plan()
        return cost.reshape(G * size, G * size), plan.reshape(G * size, G * size)

    head_cost, head_plan = compose(r, lambda p: (p.head_cost, p.heads))
    v_cost, v_plan = compose(d, lambda p: (p.v_cost, p.v_dims))
    return {
        "cost": head_cost,
        "plan": head_plan,
        "group_cost": al.group_cost.cpu().double(),
        "group_plan": TG,
        "v_cost": v_cost,
        "v_plan": v_plan,
        "report": al.figures,
    }


def _experts(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings) -> dict:
    ex = align_experts(lower, upper, ctx, settings)
    pairs = {}

    def align_and_keep(lower, upper, ctx, settings, pair) -> MlpAlignment:
        cost = mlp_cost(lower, upper, ctx, settings, pair)
        al = align_mlp_cost(cost, settings, pair)
        pairs[pair] = {"cost": cost.cpu(), "plan": al.solved.map.plan()}
        return al

    mlp = align_expert_neurons(ex, lower, upper, ctx, settings, lambda b, sources: None, align_and_keep)
    return {
        "cost": ex.cost.cpu().double(),
        "plan": ex.experts.map.plan(),
        "expert_pairs": pairs,
        "report": {**ex.figures, "neurons": mlp},
    }


def _reference(lower: Block, upper: Block, ctx: BuildContext, group: str, solver: ReferenceSolver) -> dict:
    roles = ("q", "k", "v", "o") if group == "attention" else ("gate", "up", "down")
    names = [ctx.arch.weight(r) for r in roles]
    tensors = {}

    def keep(name: str, C: torch.Tensor, T: torch.Tensor) -> None:
        if name in names:
            tensors[name] = {"cost": C.cpu(), "plan": T.cpu()}

    _, figs, _ = reference_pass(lower, upper, ctx, 0.5, solver, keep)
    return {**tensors[names[0]], "tensors": tensors, "report": group_report(figs, ctx, group, 0.5)}
