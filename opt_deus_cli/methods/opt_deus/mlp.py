"""Corrected mode, MLP (a dense one, or one expert of a mixture): ONE neuron plan shared by the
gate rows, up rows (and their biases) and down columns, so the SwiGLU pairing survives."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...architectures import MLP_ROLES, Architecture
from ...ot import cost_matrix_blocks, paired_cost, sketch_features
from ..base import Block, BuildContext
from .blocks import F32, mix
from .plans import Solved, solve, solve_later
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


def mlp_cost(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, pair: tuple[int, int] | None = None
) -> torch.Tensor:
    """(I, I) cost between A's neurons (rows) and B's, of the dense MLP or of A's expert pair[0]
    and B's expert pair[1]; with settings.sketch, between the neurons' sketched features.
    exact: the solver wants a CPU float64 matrix, so on the CPU the cost is written straight into
    one (at 8B shapes 1.6 GB, instead of a float32 copy plus a float64 copy); on a GPU it is
    computed there in float32 and moved to the CPU once. sinkhorn: float32 on the compute device."""
    a, b = pair if pair is not None else (None, None)
    Xs, Ys = mlp_features(lower, mlp_paths(ctx.arch, a)), mlp_features(upper, mlp_paths(ctx.arch, b))
    if settings.sketch is not None:
        Xs, Ys = [sketch_features(Xs, settings.sketch, ctx.device)], [sketch_features(Ys, settings.sketch, ctx.device)]
    if settings.solver != "exact":
        return cost_matrix_blocks(Xs, Ys, settings.cost, device=ctx.device)
    n = ctx.layout.intermediate
    out = torch.empty((n, n), dtype=torch.float64)
    if ctx.device.type == "cpu":
        return cost_matrix_blocks(Xs, Ys, settings.cost, out=out, device=ctx.device)
    return out.copy_(cost_matrix_blocks(Xs, Ys, settings.cost, device=ctx.device))


@dataclass
class MlpAlignment:
    solved: Solved
    figures: dict


def align_mlp_cost(
    cost: torch.Tensor,
    settings: AlignmentSettings,
    pair: tuple[int, int] | None = None,
    started: float | None = None,
    full: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    solved: Solved | None = None,
) -> MlpAlignment:
    """The neuron plan for a cost from mlp_cost (or `solved`, the plan already solved for it).
    With a sketch, `full` (the neuron features of A and B, as mlp_features gives them) lets an
    exact plan's costs be reported in full features."""
    started = time.perf_counter() if started is None else started
    if solved is None:
        solved = solve(cost, settings, "MLP neurons" if pair is None else f"neurons of expert {pair[0]} -> {pair[1]}")
    cost_before = float(cost.diagonal().mean())
    extra = {}
    if settings.sketch is not None:
        extra = {"sketch": settings.sketch, "cost_basis": f"sketch of {settings.sketch} directions"}
        if full is not None and solved.map.index is not None:
            n, device = cost.shape[0], full[0][0].device
            before = matched_cost(*full, torch.arange(n), settings.cost, device)
            # the map lists, per B neuron j, the A neuron landing on it
            solved.cost_after = float(
                matched_cost(*full, torch.argsort(solved.map.index.cpu()), settings.cost, device).mean()
            )
            cost_before, extra["cost_basis"] = float(before.mean()), "full features"
    return MlpAlignment(solved, {**solved.figures(cost_before, time.perf_counter() - started), **extra})


def align_mlp(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, pair: tuple[int, int] | None = None
) -> MlpAlignment:
    """The neuron plan of A's MLP onto B's, or of A's expert pair[0] onto B's expert pair[1]."""
    started = time.perf_counter()
    a, b = pair if pair is not None else (None, None)
    full = (mlp_features(lower, mlp_paths(ctx.arch, a)), mlp_features(upper, mlp_paths(ctx.arch, b)))
    return align_mlp_cost(mlp_cost(lower, upper, ctx, settings, pair), settings, pair, started, full)


def align_mlp_later(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings
) -> Callable[[], MlpAlignment]:
    """align_mlp of a dense MLP, whose exact solver runs in a child process while the caller
    goes on (attention, on the other core); the returned function waits and gives the alignment."""
    started = time.perf_counter()
    full = (mlp_features(lower, mlp_paths(ctx.arch)), mlp_features(upper, mlp_paths(ctx.arch)))
    cost = mlp_cost(lower, upper, ctx, settings)
    costed = time.perf_counter() - started
    pending = solve_later(cost, settings, "MLP neurons")

    def result() -> MlpAlignment:
        solved, finishing = pending(), time.perf_counter()
        al = align_mlp_cost(cost, settings, None, None, full, solved)
        # the group's own time (cost, solver, figures), not the attention's done meanwhile
        al.figures["seconds"] = costed + solved.report.seconds + (time.perf_counter() - finishing)
        return al

    return result


# one source of a fused MLP: (weight, A's expert or None for a dense MLP, its neuron alignment)
Source = tuple[float, "int | None", MlpAlignment]


def fuse_mlp(
    sources: list[Source], lower: Block, upper: Block, ctx: BuildContext, alpha: float, expert: int | None = None
) -> Block:
    """B's MLP (or B's expert `expert`) fused with alpha * sum_w w * (A's MLP or expert moved by
    its neuron map): ONE map per source for gate rows, up rows, their biases and down columns;
    down's bias (per residual dim, not per neuron) follows the source weights only. One tensor
    at a time. A dense MLP has one source of weight 1."""
    arch, dev = ctx.arch, ctx.device
    neuron_axis = {
        ("gate", ".weight"): 0,
        ("up", ".weight"): 0,
        ("down", ".weight"): 1,
        ("gate", ".bias"): 0,
        ("up", ".bias"): 0,
        ("down", ".bias"): None,
    }
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
        assert aligned is not None  # sources is not empty
        out[name] = ctx.result(mix(alpha, aligned, upper[name].to(dev, F32)), upper[name])
        del aligned
    return out


def matched_cost(
    Xs: list[torch.Tensor], Ys: list[torch.Tensor], match: torch.Tensor, kind: str, device: torch.device
) -> torch.Tensor:
    """(n,) float32: the cost between unit i of A and unit match[i] of B, from column blocks as
    cost_matrix_blocks takes them, without the n x n matrix (rows in chunks: no n x D copy)."""
    n, parts = match.numel(), []
    for lo in range(0, n, 2048):
        rows, cols = slice(lo, lo + 2048), match[lo : lo + 2048].to(Ys[0].device)

        def total(f, rows=rows, cols=cols) -> torch.Tensor:  # f summed per row over the column blocks
            return sum(f(x[rows].to(device, F32), y[cols].to(device, F32)).sum(1) for x, y in zip(Xs, Ys))

        parts.append(paired_cost(total, kind))
    return torch.cat(parts)


def identity_cost(Xs: list[torch.Tensor], Ys: list[torch.Tensor], kind: str, device: torch.device) -> torch.Tensor:
    """(n,): the cost between unit i of A and unit i of B (the identity pairing)."""
    return matched_cost(Xs, Ys, torch.arange(Xs[0].shape[0]), kind, device)
