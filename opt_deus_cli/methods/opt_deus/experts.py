"""Corrected mode, mixture of experts (mixtral, qwen3_moe): A's experts are matched to B's by one
plan, the router rows follow that plan, and each matched pair of experts is aligned and fused like
a dense MLP (one neuron plan shared by gate/up/down)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from ...ot import cost_kind, cost_matrix
from ..base import Block, BuildContext
from .blocks import F32, mix
from .mlp import MlpAlignment, Source, align_mlp, fuse_mlp, identity_cost, mlp_features, mlp_paths
from .plans import Solved, solve, worst_of
from .settings import AlignmentSettings

# Random unit directions of the sliced proxy cost between experts (fixed seed: a pair of layers
# always gets the same plan).
SLICES = 128
# An entropic expert plan gives every pair of experts some mass, and every pair kept costs a
# neuron alignment (I x I). Per B expert, the lightest sources totalling at most this share are
# dropped and the rest renormalised: that moves the fused weights by less than bf16 resolution.
DROP_MASS = 1e-3


def _sorted_slices(block: Block, paths: dict[str, str], theta: torch.Tensor, angular: bool) -> torch.Tensor:
    """(K, I): the expert's neuron features (as mlp_features) projected on the K unit directions
    theta (D, K), sorted over the neurons along each direction."""
    feats = [f.to(theta.device, F32) for f in mlp_features(block, paths)]
    proj = sum(f @ t for f, t in zip(feats, theta.split([f.shape[1] for f in feats])))  # (I, K)
    if angular:  # unit features: |u - v|^2 = 2 (1 - cos)
        norms = cast(torch.Tensor, sum(f.square().sum(1) for f in feats)).sqrt().clamp_min(torch.finfo(F32).tiny)
        proj = proj / norms[:, None]
    return proj.T.sort(dim=1).values


def expert_cost(lower: Block, upper: Block, ctx: BuildContext, kind: str) -> torch.Tensor:
    """(E, E) CPU float64 cost between A's experts (rows) and B's (columns), per neuron like the
    MLP cost.

    The exact cost of a pair, its neuron cost after aligning its neurons, takes E^2 neuron
    alignments of size I (Mixtral-8x7B: 64 of 14336 x 14336 over 12288 features; Qwen3-30B-A3B:
    16384 of 768 x 768): hours per layer. The proxy is the sliced Wasserstein distance between
    the two experts' sets of neuron features: project both on K fixed random unit directions,
    sort, compare the sorted values (optimal transport in 1-D). It ignores the neuron order (0 for
    a neuron-permuted copy), costs I * D * K per expert, and, scaled by D, estimates a lower bound
    of the aligned cost in its units (projected on a unit direction, any matching costs at least
    the sorted one, and a uniform unit direction keeps 1/D of a squared norm on average).
    The router rows are fused along with their experts, so their distance is added as one more
    feature of the expert, spread over its I neurons. euclidean: the square root (an RMS)."""
    arch, dev = ctx.arch, ctx.device
    E, I = ctx.layout.num_experts, ctx.layout.intermediate
    spec = cost_kind(kind)
    D = sum(f.shape[1] for f in mlp_features(upper, mlp_paths(arch, 0)))
    theta = torch.randn(D, SLICES, generator=torch.Generator().manual_seed(0), dtype=F32)
    theta = (theta / theta.norm(dim=0)).to(dev)  # (D, K), unit columns
    SA = torch.stack([_sorted_slices(lower, mlp_paths(arch, e), theta, spec.angular) for e in range(E)])  # (E, K, I)
    SB = torch.stack([_sorted_slices(upper, mlp_paths(arch, e), theta, spec.angular) for e in range(E)])
    sliced = D * torch.stack([(SA[a] - SB).square().mean((1, 2)) for a in range(E)])  # (E, E)
    if spec.angular:
        sliced = sliced / 2
    routers = (lower[arch.router].to(dev, F32), upper[arch.router].to(dev, F32))  # (E, hidden) each
    cost = (sliced + cost_matrix(*routers, spec.squared) / I).double().cpu()
    return cost.sqrt() if spec.root else cost


def _heaviest(sources: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], float]:
    """One B expert's (A expert, weight) sources without the lightest ones totalling at most
    DROP_MASS, renormalised; and the mass dropped."""
    ranked = sorted(sources, key=lambda s: -s[1])
    keep = 1
    while keep < len(ranked) and sum(w for _, w in ranked[keep:]) > DROP_MASS:
        keep += 1
    total = sum(w for _, w in ranked[:keep])
    return [(a, w / total) for a, w in ranked[:keep]], sum(w for _, w in ranked[keep:])


@dataclass
class ExpertAlignment:
    experts: Solved  # the (E, E) plan of A's experts onto B's
    cost: torch.Tensor  # (E, E), the proxy cost it was solved for
    sources: list[list[tuple[int, float]]]  # per B expert: (A expert, weight), weights summing to 1
    figures: dict  # report["experts"]


def align_experts(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings) -> ExpertAlignment:
    start = time.perf_counter()
    cost = expert_cost(lower, upper, ctx, settings.cost)
    experts = solve(cost, settings, "experts")
    sources, dropped = zip(*(_heaviest(experts.map.sources(b)) for b in range(ctx.layout.num_experts)))
    figures = experts.figures(float(cost.diagonal().mean()), time.perf_counter() - start)
    figures["cost_proxy"] = f"sliced Wasserstein of the neuron features ({SLICES} directions) + router rows"
    figures["dropped_mass"] = max(dropped)
    return ExpertAlignment(experts, cost, list(sources), figures)


AlignPair = Callable[[Block, Block, BuildContext, AlignmentSettings, tuple[int, int]], MlpAlignment]


def align_expert_neurons(
    ex: ExpertAlignment,
    lower: Block,
    upper: Block,
    ctx: BuildContext,
    settings: AlignmentSettings,
    on_expert: Callable[[int, list[Source]], None],
    align: AlignPair = align_mlp,
) -> dict:
    """Aligns the neurons of every pair of experts the expert plan uses, one B expert at a time (a
    Sinkhorn neuron plan at Mixtral's size is 0.8 GB: they are not all kept), and hands each B
    expert's [(weight, A expert, alignment)] to on_expert(b, sources). `align` aligns one pair
    (inspection passes one that also keeps the matrices). Returns the figures of all these plans:
    worst case; costs are means weighted by the expert plan's mass, cost_before is the identity
    pairing of experts and of neurons (as for a dense MLP)."""
    arch, E = ctx.arch, ctx.layout.num_experts
    used: list[tuple[float, dict]] = []  # (mass, figures) of every neuron plan
    for b, src in enumerate(ex.sources):
        aligned: list[Source] = [(w, a, align(lower, upper, ctx, settings, (a, b))) for a, w in src]
        on_expert(b, aligned)
        used += [(w / E, al.figures) for w, _, al in aligned]
    before = torch.cat(
        [
            identity_cost(
                mlp_features(lower, mlp_paths(arch, e)),
                mlp_features(upper, mlp_paths(arch, e)),
                settings.cost,
                ctx.device,
            )
            for e in range(E)
        ]
    )
    every = [f for _, f in used]
    return {
        "solver": every[0]["solver"],
        "epsilon": every[0]["epsilon"],
        "plans": len(every),
        **worst_of(every),
        "cost_before": float(before.mean()),
        "cost_after": sum(m * f["cost_after"] for m, f in used),
        "permutation_likeness": min(f["permutation_likeness"] for f in every),
        "seconds": sum(f["seconds"] for f in every),
    }


def fuse_router(ex: ExpertAlignment, lower: Block, upper: Block, ctx: BuildContext, alpha: float) -> Block:
    """Router row b (which tokens go to expert b) comes from A's rows with the weights of expert
    b's sources, so a fused expert keeps a matching fused routing."""
    name, dev = ctx.arch.router, ctx.device
    RA = lower[name].to(dev, F32)  # (E, hidden)
    aligned = torch.stack([sum(w * RA[a] for a, w in src) for src in ex.sources])
    return {name: ctx.result(mix(alpha, aligned, upper[name].to(dev, F32)), upper[name])}


def build_experts(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, alpha: float
) -> tuple[Block, dict]:
    ex = align_experts(lower, upper, ctx, settings)
    out: Block = {}

    def fuse(b: int, sources: list[Source]) -> None:
        out.update(fuse_mlp(sources, lower, upper, ctx, alpha, expert=b))

    mlp = align_expert_neurons(ex, lower, upper, ctx, settings, fuse)
    out.update(fuse_router(ex, lower, upper, ctx, alpha))
    return out, {"experts": ex.figures, "mlp": mlp}
