"""Corrected mode, MLP (a dense one, or one expert of a mixture): ONE neuron plan shared by the
gate rows, up rows (and their biases) and down columns, so the SwiGLU pairing survives."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...architectures import MLP_ROLES, Architecture
from ...ot import cost_matrix_blocks
from ..base import Block, BuildContext
from .blocks import F32, mix
from .plans import Solved, solve
from .settings import AlignmentSettings


def mlp_paths(arch: Architecture, expert: int | None = None) -> dict[str, str]:
    """role -> module path of the dense MLP's gate/up/down, or of expert `expert`'s."""
    if expert is None:
        return {r: arch.projections[r] for r in MLP_ROLES}
    return {r: arch.experts[r].format(e=expert) for r in MLP_ROLES}


def mlp_features(block: Block, paths: dict[str, str]) -> list[torch.Tensor]:
    """Column blocks of the (I, D) neuron features: gate row, up row, down column, gate/up biases.
    Views in the stored dtype: the cost converts them tile by tile."""
    feats = [block[paths["gate"] + ".weight"], block[paths["up"] + ".weight"], block[paths["down"] + ".weight"].T]
    feats += [block[paths[r] + ".bias"][:, None] for r in ("gate", "up") if paths[r] + ".bias" in block]
    return feats


def mlp_cost(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings,
             pair: tuple[int, int] | None = None) -> torch.Tensor:
    """(I, I) cost between A's neurons (rows) and B's, of the dense MLP or of A's expert pair[0]
    and B's expert pair[1]. exact: the solver wants a CPU float64 matrix, so the cost is written
    straight into one (at 8B shapes 1.6 GB, instead of a float32 copy plus a float64 copy);
    sinkhorn: float32 on the compute device."""
    a, b = pair if pair is not None else (None, None)
    n = ctx.layout.intermediate
    out = torch.empty((n, n), dtype=torch.float64) if settings.solver == "exact" else None
    return cost_matrix_blocks(
        mlp_features(lower, mlp_paths(ctx.arch, a)),
        mlp_features(upper, mlp_paths(ctx.arch, b)),
        settings.cost,
        out=out,
        device=ctx.device,
    )


@dataclass
class MlpAlignment:
    solved: Solved
    figures: dict


def align_mlp_cost(cost: torch.Tensor, settings: AlignmentSettings, pair: tuple[int, int] | None = None,
                   started: float | None = None) -> MlpAlignment:
    """The neuron plan for a cost from mlp_cost."""
    started = time.perf_counter() if started is None else started
    cost_before = float(cost.diagonal().mean())
    solved = solve(cost, settings, "MLP neurons" if pair is None else f"neurons of expert {pair[0]} -> {pair[1]}")
    return MlpAlignment(solved, solved.figures(cost_before, time.perf_counter() - started))


def align_mlp(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings,
              pair: tuple[int, int] | None = None) -> MlpAlignment:
    """The neuron plan of A's MLP onto B's, or of A's expert pair[0] onto B's expert pair[1]."""
    started = time.perf_counter()
    return align_mlp_cost(mlp_cost(lower, upper, ctx, settings, pair), settings, pair, started)


# one source of a fused MLP: (weight, A's expert or None for a dense MLP, its neuron alignment)
Source = tuple[float, "int | None", MlpAlignment]


def fuse_mlp(sources: list[Source], lower: Block, upper: Block, ctx: BuildContext, alpha: float,
             expert: int | None = None) -> Block:
    """B's MLP (or B's expert `expert`) fused with alpha * sum_w w * (A's MLP or expert moved by
    its neuron map): ONE map per source for gate rows, up rows, their biases and down columns;
    down's bias (per residual dim, not per neuron) follows the source weights only. One tensor
    at a time. A dense MLP has one source of weight 1."""
    arch, dev = ctx.arch, ctx.device
    neuron_axis = {("gate", ".weight"): 0, ("up", ".weight"): 0, ("down", ".weight"): 1,
                   ("gate", ".bias"): 0, ("up", ".bias"): 0, ("down", ".bias"): None}
    out = {}
    for (role, suffix), dim in neuron_axis.items():
        name = mlp_paths(arch, expert)[role] + suffix
        if name not in upper:
            continue
        aligned = None
        for w, a, al in sources:
            t = lower[mlp_paths(arch, a)[role] + suffix].to(dev, F32)
            moved = t if dim is None else al.solved.map.apply(t, dim)
            moved = moved if w == 1.0 else w * moved  # the exact solver's single source: a pure gather
            aligned = moved if aligned is None else aligned + moved
        out[name] = ctx.result(mix(alpha, aligned, upper[name].to(dev, F32)), upper[name])
        del aligned
    return out


def identity_cost(Xs: list[torch.Tensor], Ys: list[torch.Tensor], kind: str, device: torch.device) -> torch.Tensor:
    """(n,): the cost between unit i of A and unit i of B (the identity pairing), from column
    blocks as cost_matrix_blocks takes them, without the n x n matrix."""

    def total(f) -> torch.Tensor:  # a per-row quantity summed over the column blocks
        return sum(f(x.to(device, F32), y.to(device, F32)) for x, y in zip(Xs, Ys))

    if kind == "cosine":
        dot = total(lambda x, y: (x * y).sum(1))
        norms = total(lambda x, y: x.square().sum(1)) * total(lambda x, y: y.square().sum(1))
        return 1.0 - dot / norms.sqrt().clamp_min(torch.finfo(F32).tiny)
    sq = total(lambda x, y: (x - y).square().sum(1))
    return sq if kind == "sqeuclidean" else sq.sqrt()
