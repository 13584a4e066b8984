"""OpT-DeUS: the new layer is the upper neighbour B fused with the lower neighbour A after A's
neurons have been aligned onto B's by optimal transport.

Two semantics (METHOD.md):
- "corrected" (default, section 2): the residual dimension is never transported; attention is
  aligned KV group -> query heads within the group -> value dims within the KV head, with
  the o_proj columns following; the MLP uses ONE plan for gate rows, up rows (and biases) and
  down columns; plans are applied as barycentric maps; fused = alpha * aligned(A) + (1 - alpha) * B;
  norms are alpha-weighted averages: alpha * A + (1 - alpha) * B.
- "reference" (section 1): the published script, tensor by tensor, with its known defects.

Mixture of experts (mixtral, qwen3_moe; corrected mode only: the published script has no rule
for experts, so reference mode refuses them): A's experts are matched to B's experts by one
plan, the router rows follow that plan, and each matched pair of experts is aligned and fused
like a dense MLP (one neuron plan shared by gate/up/down).

Zero-initialising o_proj / down_proj is the pipeline's job: the tensors returned here are the
fused ones.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from ..architectures import MLP_ROLES, Architecture, HeadLayout, expected_block_shapes
from ..errors import OptDeusError, UsageError
from ..ot import (
    AlignmentSettings,
    all_finite,
    PlanReport,
    assignment_plan,
    barycentric_map,
    cost_matrix,
    cost_matrix_blocks,
    exact_assignment,
    permutation_likeness,
    sinkhorn_plan,
    sinkhorn_reference,
)
from .average import average_blocks
from .base import Block, BuildContext

# The published solver settings (reference mode). Module constants so that a benchmark can cap
# the iterations and extrapolate; nothing else should change them.
REFERENCE_REG = 0.06
REFERENCE_MAX_ITER = 10000
REFERENCE_STOP_THR = 1e-9

_reference_warned = False

F32 = torch.float32


class OptDeusMethod:
    name = "opt-deus"
    needs_upper = True
    default_zero_init: tuple[str, ...] = ("o_proj", "down_proj")
    supports_experts = True  # corrected mode only; reference mode refuses them (see prepare)

    def __init__(self, settings: AlignmentSettings = AlignmentSettings(), alpha: float = 0.5):
        self.settings = settings.validate()
        self.alpha = float(alpha)

    def prepare(self, job, progress=None) -> None:
        """Runs before any layer is written: refuse what build() would refuse on the first new layer."""
        _refuse_reference_experts(self.settings, job.arch)

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        if upper is None:
            raise OptDeusError("opt-deus builds a layer from two neighbours; it cannot follow the top layer")
        _refuse_reference_experts(self.settings, ctx.arch)
        check_blocks(lower, upper, ctx.arch, ctx.layout)
        if self.settings.mode == "reference":
            _warn_reference_once()
            return _build_reference(lower, upper, ctx, self.alpha)
        return _build_corrected(lower, upper, ctx, self.settings, self.alpha)


def alignment_matrices(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, group: str) -> dict:
    """Cost matrices and plans of one group, for inspection (CPU tensors, rows = A's units in
    their original order, columns = B's).

    corrected, "attention": cost/plan (H, H) between query heads (cost of head (a, i) vs (b, j)
    with the (a, b) value-dim map applied; plan = group plan x head plan), group_cost/group_plan
    (G, G) between KV groups, v_cost/v_plan (G*d, G*d) between value dims likewise.
    corrected, "mlp": cost/plan (I, I) between MLP neurons; on a mixture of experts, cost/plan
    (E, E) between experts (the sliced proxy cost, see _expert_cost) and "expert_pairs":
    {(a, b): {cost, plan}} (I, I) between the neurons of every pair of experts the fusion uses.
    reference: cost/plan of q_proj (attention) or gate_proj (mlp), and "tensors": {name: {cost, plan}}
    for every tensor of the group. Every answer also has "report": the group's figures.
    """
    settings.validate()
    if group not in ("attention", "mlp"):
        raise OptDeusError(f"unknown alignment group {group!r}; expected attention or mlp")
    _refuse_reference_experts(settings, ctx.arch)
    check_blocks(lower, upper, ctx.arch, ctx.layout)
    if settings.mode == "reference":
        return _reference_matrices(lower, upper, ctx, group)
    if group == "mlp" and ctx.arch.experts:
        return _expert_matrices(lower, upper, ctx, settings)
    if group == "mlp":
        al = _align_mlp(lower, upper, ctx, settings, keep=True)
        return {"cost": al.solved.cost.cpu(), "plan": al.solved.plan.cpu(), "report": al.figures}
    al = _align_attention(lower, upper, ctx, settings, keep=True)
    G, r, d = ctx.layout.num_kv_heads, ctx.layout.heads_per_group, ctx.layout.head_dim
    TG = al.group.plan.cpu().double()

    def compose(size: int, pick) -> tuple[torch.Tensor, torch.Tensor]:
        # (G*size, G*size) with block (a, b) = that pair's inner cost, and plan T_G[a, b] * T_inner
        cost = torch.zeros(G, size, G, size, dtype=torch.float64)
        plan = torch.zeros_like(cost)
        for (a, b), pair in al.pairs.items():
            inner = pick(pair)
            cost[a, :, b, :] = inner.cost.cpu().double()
            plan[a, :, b, :] = TG[a, b] * inner.plan.cpu().double()
        return cost.reshape(G * size, G * size), plan.reshape(G * size, G * size)

    head_cost, head_plan = compose(r, lambda p: p.heads)
    v_cost, v_plan = compose(d, lambda p: p.v_dims)
    return {
        "cost": head_cost,
        "plan": head_plan,
        "group_cost": al.group.cost.cpu().double(),
        "group_plan": TG,
        "v_cost": v_cost,
        "v_plan": v_plan,
        "report": al.figures,
    }


# ---------------------------------------------------------------------------------------------
# checks and small helpers


def check_blocks(lower: Block, upper: Block, arch: Architecture, layout: HeadLayout) -> None:
    """Both blocks have the same tensors, with the shapes the config implies, all finite."""
    if lower.keys() != upper.keys():
        raise OptDeusError(f"the two source layers have different tensors: {sorted(lower.keys() ^ upper.keys())}")
    expected = expected_block_shapes(arch, layout)
    for role in arch.projections:
        expected[arch.bias(role)] = (layout.weight_shape(role)[0],)
    for role, path in arch.experts.items():
        expected.update({path.format(e=e) + ".bias": (layout.weight_shape(role)[0],) for e in range(layout.num_experts)})
    for name, t in upper.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise OptDeusError(f"tensor {name} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        if lower[name].shape != t.shape:
            raise OptDeusError(f"tensor {name}: shapes differ between the source layers")
    missing = [n for n in expected_block_shapes(arch, layout) if n not in upper]
    if missing:
        raise OptDeusError(f"source layers lack {', '.join(missing)}; is the model_type right?")
    for which, block in (("lower", lower), ("upper", upper)):
        for name, t in block.items():
            if not all_finite(t):
                raise OptDeusError(f"{which} source layer: tensor {name} contains NaN or Inf")


def _refuse_reference_experts(settings: AlignmentSettings, arch: Architecture) -> None:
    if settings.mode == "reference" and arch.experts:
        raise UsageError(
            f"opt-deus reference mode reproduces the published script, which has no rule for "
            f"mixture-of-experts layers ({arch.model_type}); use alignment mode: corrected"
        )


def _warn_reference_once() -> None:
    global _reference_warned
    if not _reference_warned:
        _reference_warned = True
        warnings.warn(
            "opt-deus reference mode reproduces the published script with its known defects "
            "(unnormalised transport halves q/k/v/gate/up, q/k and gate/up get independent plans, "
            "heads and GQA groups are ignored; METHOD.md section 1); use mode: corrected unless "
            "you are reproducing the paper",
            UserWarning,
            stacklevel=3,
        )


def _finish(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A result tensor as the pipeline wants it: CPU, the source dtype, contiguous."""
    return t.to(device="cpu", dtype=like.dtype).contiguous()


def _mix(alpha: float, aligned: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return alpha * aligned + (1.0 - alpha) * b


class _Map:
    """Barycentric map of one plan, moving A's units (along some axis) onto B's units.
    index (m,): B's unit j receives A's unit index[j] (exact solver: a pure gather, no arithmetic);
    P (m, n): B's unit j receives sum_i P[j, i] * A's unit i (entropic solver)."""

    def __init__(self, index: torch.Tensor | None = None, P: torch.Tensor | None = None):
        self.index, self.P = index, P

    def apply(self, W: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.index is not None:
            return W.index_select(dim, self.index.to(W.device))
        P = self.P.to(device=W.device, dtype=W.dtype)
        return torch.tensordot(P, W, dims=([1], [dim])).movedim(0, dim)

    def sources(self, j: int) -> list[tuple[int, float]]:
        """(A unit, weight) pairs that make up B's unit j (weights sum to 1; zeros skipped)."""
        if self.index is not None:
            return [(int(self.index[j]), 1.0)]
        row = self.P[j]
        return [(int(i), float(row[i])) for i in torch.nonzero(row > 0).flatten()]


@dataclass
class _Solved:
    map: _Map
    report: PlanReport
    cost_after: float  # mean matched cost under the plan (mass-normalised)
    likeness: float
    cost: torch.Tensor | None = None  # kept for inspection only
    plan: torch.Tensor | None = None


def _solve(cost: torch.Tensor, settings: AlignmentSettings, what: str, keep: bool = False) -> _Solved:
    """Plan for `cost` (n, m) with the configured solver, as a map plus figures."""
    if settings.solver == "exact":
        col, report = exact_assignment(cost, what)
        n = col.numel()
        cost_after = float(cost[torch.arange(n, device=cost.device), col.to(cost.device)].mean())
        # col[i] = B unit of A unit i; the map needs the inverse: A unit landing on B unit j
        solved = _Solved(_Map(index=torch.argsort(col)), report, cost_after, 1.0)
        if keep:
            solved.plan = assignment_plan(col)
    else:
        T, report = sinkhorn_plan(cost, settings.epsilon, settings.max_iter, settings.tol, what)
        cost_after = float(torch.dot(T.reshape(-1), cost.reshape(-1).to(T.dtype)) / T.sum())
        solved = _Solved(_Map(P=barycentric_map(T)), report, cost_after, permutation_likeness(T))
        if keep:
            solved.plan = T
    if keep:
        solved.cost = cost
    return solved


def _figures(report: PlanReport, cost_before: float, cost_after: float | None, likeness: float, seconds: float) -> dict:
    return {
        "solver": report.solver,
        "epsilon": report.epsilon,
        "iterations": report.iterations,
        "marginal_error": report.marginal_error,
        "converged": report.converged,
        "cost_before": float(cost_before),
        "cost_after": cost_after,
        "permutation_likeness": likeness,
        "seconds": seconds,
        "warnings": list(report.warnings),
    }


def _solved_figures(solved: _Solved, cost_before: float, seconds: float) -> dict:
    return _figures(solved.report, cost_before, solved.cost_after, solved.likeness, seconds)


def _summary(plans: dict, weights: dict) -> dict:
    """Figures of the many small inner plans of attention (one per pair of KV groups): worst case
    over all of them, and their permutation likeness weighted by how much the fusion uses each
    pair (the KV-group plan's mass)."""
    every = list(plans.values())
    return {
        "plans": len(every),
        "iterations": max(p.report.iterations for p in every),
        "marginal_error": max(p.report.marginal_error for p in every),
        "converged": all(p.report.converged for p in every),
        "permutation_likeness": sum(w * plans[pair].likeness for pair, w in weights.items()),
        "warnings": sorted({w for p in every for w in p.report.warnings}),
    }


def _parts_cost(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], kind: str) -> float:
    """The cost between two units made of several tensors (a KV group: q, k, v, o, biases) as if
    each were flattened and concatenated, without building the concatenation, and without the
    |x|^2 + |y|^2 - 2 x.y cancellation for the distances."""
    if kind == "cosine":
        dot = sum(float(torch.vdot(x[k].reshape(-1), y[k].reshape(-1))) for k in y)
        norms = sum(float(x[k].square().sum()) for k in y) * sum(float(y[k].square().sum()) for k in y)
        return 1.0 - dot / norms**0.5 if norms > 0 else 1.0
    sq = sum(float(torch.dist(x[k], y[k])) ** 2 for k in y)
    return sq if kind == "sqeuclidean" else sq**0.5


# ---------------------------------------------------------------------------------------------
# corrected mode: attention


@dataclass
class _Heads:
    """A block's attention in per-KV-group form (float32, compute device). G groups of r query
    heads, head_dim d, hidden h. q, o: (G, r, d, h) with o[g, i, j] the o_proj column fed by dim j
    of query head i of group g (query head g*r + i uses KV head g, as in HF repeat_kv);
    k, v: (G, d, h); biases qb (G, r, d), kb, vb (G, d), or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    qb: torch.Tensor | None
    kb: torch.Tensor | None
    vb: torch.Tensor | None

    @classmethod
    def of(cls, block: Block, arch: Architecture, layout: HeadLayout, device: torch.device) -> "_Heads":
        G, r, d, h = layout.num_kv_heads, layout.heads_per_group, layout.head_dim, layout.hidden

        def get(name: str, *shape: int) -> torch.Tensor | None:
            return block[name].to(device, F32).reshape(shape) if name in block else None

        return cls(
            q=get(arch.weight("q"), G, r, d, h),
            k=get(arch.weight("k"), G, d, h),
            v=get(arch.weight("v"), G, d, h),
            # o_proj (h, H*d): its transpose lists the columns head by head, dim by dim
            o=block[arch.weight("o")].to(device, F32).T.reshape(G, r, d, h),
            qb=get(arch.bias("q"), G, r, d),
            kb=get(arch.bias("k"), G, d),
            vb=get(arch.bias("v"), G, d),
        )

    def group(self, g: int) -> dict[str, torch.Tensor]:
        """The tensors of KV group g (views): q, o (r, d, h), k, v (d, h), qb (r, d), kb, vb (d,)."""
        parts = {"q": self.q, "qb": self.qb, "k": self.k, "kb": self.kb, "v": self.v, "vb": self.vb, "o": self.o}
        return {k: t[g] for k, t in parts.items() if t is not None}

    def v_features(self, g: int) -> torch.Tensor:
        """(d, 2h [+1]): per value dim, its v row, its bias, and the sum over the group's query heads
        of the o_proj column it feeds (a sum, so that it does not depend on the head matching)."""
        cols = [self.v[g]] + ([self.vb[g][:, None]] if self.vb is not None else []) + [self.o[g].sum(0)]
        return torch.cat(cols, 1)


def _head_features(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(r, D): per query head, its q rows (in order: RoPE pairs are not permuted), q bias, o columns."""
    r = parts["q"].shape[0]
    cols = [parts["q"].reshape(r, -1)] + ([parts["qb"]] if "qb" in parts else []) + [parts["o"].reshape(r, -1)]
    return torch.cat(cols, 1)


def _align_group(
    parts: dict[str, torch.Tensor], heads: _Map, vdims: _Map, o_vdims_moved: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Group a's tensors moved onto group b's slots: query heads by `heads`, value dims by `vdims`
    (v rows, v bias and the matching o columns of every head); k is never permuted inside.
    o_vdims_moved: parts["o"] already moved by `vdims` (the maps act on different axes and commute)."""
    out = dict(parts)
    out["q"] = heads.apply(parts["q"], 0)
    moved = o_vdims_moved if o_vdims_moved is not None else vdims.apply(parts["o"], 1)
    out["o"] = heads.apply(moved, 0)
    out["v"] = vdims.apply(parts["v"], 0)
    if "qb" in parts:
        out["qb"] = heads.apply(parts["qb"], 0)
    if "vb" in parts:
        out["vb"] = vdims.apply(parts["vb"], 0)
    return out


@dataclass
class _Pair:
    v_dims: _Solved
    heads: _Solved


@dataclass
class _AttentionAlignment:
    A: _Heads
    B: _Heads
    pairs: dict[tuple[int, int], _Pair]  # (group of A, group of B) -> inner plans
    group: _Solved
    figures: dict


def _align_attention(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, keep: bool = False
) -> _AttentionAlignment:
    start = time.perf_counter()
    A = _Heads.of(lower, ctx.arch, ctx.layout, ctx.device)
    B = _Heads.of(upper, ctx.arch, ctx.layout, ctx.device)
    G, kind = ctx.layout.num_kv_heads, settings.cost
    # Inner plans for every pair of groups: value dims first (their features do not depend on
    # the head matching), then query heads with the o columns already moved by the v-dim map.
    # The group cost is the cost of the whole group a, aligned by those plans, against group b.
    parts_A = [A.group(g) for g in range(G)]
    parts_B = [B.group(g) for g in range(G)]
    v_feats_A = [A.v_features(g) for g in range(G)]
    v_feats_B = [B.v_features(g) for g in range(G)]
    head_feats_B = [_head_features(p) for p in parts_B]
    pairs: dict[tuple[int, int], _Pair] = {}
    group_cost = torch.empty((G, G), dtype=torch.float64)
    for a in range(G):
        for b in range(G):
            where = f"KV group {a} -> {b}"
            v_cost = cost_matrix(v_feats_A[a], v_feats_B[b], kind)  # (d, d)
            vd = _solve(v_cost, settings, f"attention value dims, {where}", keep)
            o_moved = vd.map.apply(parts_A[a]["o"], 1)
            head_cost = cost_matrix(_head_features({**parts_A[a], "o": o_moved}), head_feats_B[b], kind)  # (r, r)
            hd = _solve(head_cost, settings, f"attention query heads, {where}", keep)
            pairs[a, b] = _Pair(vd, hd)
            group_cost[a, b] = _parts_cost(_align_group(parts_A[a], hd.map, vd.map, o_moved), parts_B[b], kind)
    cost_before = sum(_parts_cost(parts_A[g], parts_B[g], kind) for g in range(G)) / G
    group = _solve(group_cost.to(ctx.device), settings, "attention KV groups", keep)
    inner_v = {pair: p.v_dims for pair, p in pairs.items()}
    inner_h = {pair: p.heads for pair, p in pairs.items()}
    used = {(a, b): w / G for b in range(G) for a, w in group.map.sources(b)}  # mass of the KV-group plan
    figures = _solved_figures(group, cost_before, time.perf_counter() - start)
    # top-level figures cover every plan of the group: the worst case of all levels
    every = [group, *inner_v.values(), *inner_h.values()]
    figures["iterations"] = max(p.report.iterations for p in every)
    figures["marginal_error"] = max(p.report.marginal_error for p in every)
    figures["converged"] = all(p.report.converged for p in every)
    figures["warnings"] = sorted({w for p in every for w in p.report.warnings})
    figures["levels"] = {
        "kv_groups": _solved_figures(group, cost_before, group.report.seconds),
        "query_heads": _summary(inner_h, used),
        "v_dims": _summary(inner_v, used),
    }
    return _AttentionAlignment(A, B, pairs, group, figures)


def _fuse_attention(al: _AttentionAlignment, upper: Block, ctx: BuildContext, alpha: float) -> Block:
    """New group b = alpha * sum_a P_G[b, a] * (group a aligned by the (a, b) plans) + (1 - alpha) * B's group b."""
    G = ctx.layout.num_kv_heads
    fused_groups = []
    for b in range(G):
        target = al.B.group(b)
        aligned = None
        for a, w in al.group.map.sources(b):
            pair = al.pairs[a, b]
            moved = _align_group(al.A.group(a), pair.heads.map, pair.v_dims.map)
            weighted = {k: w * t for k, t in moved.items()}
            aligned = weighted if aligned is None else {k: aligned[k] + weighted[k] for k in weighted}
        fused_groups.append({k: _mix(alpha, aligned[k], target[k]) for k in target})
    stacked = {k: torch.stack([g[k] for g in fused_groups]) for k in fused_groups[0]}
    arch, h = ctx.arch, ctx.layout.hidden
    out = {
        arch.weight("q"): stacked["q"].reshape(-1, h),
        arch.weight("k"): stacked["k"].reshape(-1, h),
        arch.weight("v"): stacked["v"].reshape(-1, h),
        arch.weight("o"): stacked["o"].reshape(-1, h).T,
    }
    for role, key in (("q", "qb"), ("k", "kb"), ("v", "vb")):
        if key in stacked:
            out[arch.bias(role)] = stacked[key].reshape(-1)
    return {name: _finish(t, upper[name]) for name, t in out.items()}


# ---------------------------------------------------------------------------------------------
# corrected mode: MLP (a dense one, or one expert of a mixture)


def _mlp_paths(arch: Architecture, expert: int | None = None) -> dict[str, str]:
    """role -> module path of the dense MLP's gate/up/down, or of expert `expert`'s."""
    if expert is None:
        return {r: arch.projections[r] for r in MLP_ROLES}
    return {r: arch.experts[r].format(e=expert) for r in MLP_ROLES}


@dataclass
class _MlpAlignment:
    solved: _Solved
    figures: dict


def _mlp_features(block: Block, paths: dict[str, str]) -> list[torch.Tensor]:
    """Column blocks of the (I, D) neuron features: gate row, up row, down column, gate/up biases.
    Views in the stored dtype: the cost converts them tile by tile."""
    feats = [block[paths["gate"] + ".weight"], block[paths["up"] + ".weight"], block[paths["down"] + ".weight"].T]
    feats += [block[paths[r] + ".bias"][:, None] for r in ("gate", "up") if paths[r] + ".bias" in block]
    return feats


def _align_mlp(
    lower: Block,
    upper: Block,
    ctx: BuildContext,
    settings: AlignmentSettings,
    keep: bool = False,
    pair: tuple[int, int] | None = None,
) -> _MlpAlignment:
    """The neuron plan of A's MLP onto B's, or of A's expert pair[0] onto B's expert pair[1]."""
    start = time.perf_counter()
    a, b = pair if pair is not None else (None, None)
    n = ctx.layout.intermediate
    # exact: scipy wants a CPU float64 matrix, so the cost is written straight into one
    # (at 8B shapes 1.6 GB, instead of a float32 copy plus a float64 copy); sinkhorn: float32 on device
    out = torch.empty((n, n), dtype=torch.float64) if settings.solver == "exact" else None
    cost = cost_matrix_blocks(
        _mlp_features(lower, _mlp_paths(ctx.arch, a)),
        _mlp_features(upper, _mlp_paths(ctx.arch, b)),
        settings.cost,
        out=out,
        device=ctx.device,
    )
    cost_before = float(cost.diagonal().mean())
    solved = _solve(cost, settings, "MLP neurons" if pair is None else f"neurons of expert {a} -> {b}", keep)
    figures = _solved_figures(solved, cost_before, time.perf_counter() - start)
    return _MlpAlignment(solved, figures)


# one source of a fused MLP: (weight, A's expert or None for a dense MLP, its neuron alignment)
_Source = tuple[float, "int | None", _MlpAlignment]


def _fuse_mlp(
    sources: list[_Source], lower: Block, upper: Block, ctx: BuildContext, alpha: float, expert: int | None = None
) -> Block:
    """B's MLP (or B's expert `expert`) fused with alpha * sum_w w * (A's MLP or expert moved by
    its neuron map): ONE map per source for gate rows, up rows, their biases and down columns;
    down's bias (per residual dim, not per neuron) follows the source weights only. One tensor
    at a time. A dense MLP has one source of weight 1."""
    arch, dev = ctx.arch, ctx.device
    neuron_axis = {("gate", ".weight"): 0, ("up", ".weight"): 0, ("down", ".weight"): 1,
                   ("gate", ".bias"): 0, ("up", ".bias"): 0, ("down", ".bias"): None}
    out = {}
    for (role, suffix), dim in neuron_axis.items():
        name = _mlp_paths(arch, expert)[role] + suffix
        if name not in upper:
            continue
        aligned = None
        for w, a, al in sources:
            t = lower[_mlp_paths(arch, a)[role] + suffix].to(dev, F32)
            moved = t if dim is None else al.solved.map.apply(t, dim)
            moved = moved if w == 1.0 else w * moved  # the exact solver's single source: a pure gather
            aligned = moved if aligned is None else aligned + moved
        out[name] = _finish(_mix(alpha, aligned, upper[name].to(dev, F32)), upper[name])
        del aligned
    return out


# ---------------------------------------------------------------------------------------------
# corrected mode: mixture of experts

# Random unit directions of the sliced proxy cost between experts (fixed seed: a pair of layers
# always gets the same plan).
_SLICES = 128
# An entropic expert plan gives every pair of experts some mass, and every pair kept costs a
# neuron alignment (I x I). Per B expert, the lightest sources totalling at most this share are
# dropped and the rest renormalised: that moves the fused weights by less than bf16 resolution.
_DROP_MASS = 1e-3


def _sorted_slices(block: Block, paths: dict[str, str], theta: torch.Tensor, cosine: bool) -> torch.Tensor:
    """(K, I): the expert's neuron features (as _mlp_features) projected on the K unit directions
    theta (D, K), sorted over the neurons along each direction."""
    feats = [f.to(theta.device, F32) for f in _mlp_features(block, paths)]
    proj = sum(f @ t for f, t in zip(feats, theta.split([f.shape[1] for f in feats])))  # (I, K)
    if cosine:  # unit features: |u - v|^2 = 2 (1 - cos)
        norms = sum(f.square().sum(1) for f in feats).sqrt().clamp_min(torch.finfo(F32).tiny)
        proj = proj / norms[:, None]
    return proj.T.sort(dim=1).values


def _expert_cost(lower: Block, upper: Block, ctx: BuildContext, kind: str) -> torch.Tensor:
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
    cosine = kind == "cosine"
    D = sum(f.shape[1] for f in _mlp_features(upper, _mlp_paths(arch, 0)))
    theta = torch.randn(D, _SLICES, generator=torch.Generator().manual_seed(0), dtype=F32)
    theta = (theta / theta.norm(dim=0)).to(dev)  # (D, K), unit columns
    SA = torch.stack([_sorted_slices(lower, _mlp_paths(arch, e), theta, cosine) for e in range(E)])  # (E, K, I)
    SB = torch.stack([_sorted_slices(upper, _mlp_paths(arch, e), theta, cosine) for e in range(E)])
    sliced = D * torch.stack([(SA[a] - SB).square().mean((1, 2)) for a in range(E)])  # (E, E)
    if cosine:
        sliced = sliced / 2
    routers = (lower[arch.router].to(dev, F32), upper[arch.router].to(dev, F32))  # (E, hidden) each
    cost = (sliced + cost_matrix(*routers, "cosine" if cosine else "sqeuclidean") / I).double().cpu()
    return cost.sqrt() if kind == "euclidean" else cost


def _identity_cost(Xs: list[torch.Tensor], Ys: list[torch.Tensor], kind: str, device: torch.device) -> torch.Tensor:
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


def _heaviest(sources: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], float]:
    """One B expert's (A expert, weight) sources without the lightest ones totalling at most
    _DROP_MASS, renormalised; and the mass dropped."""
    ranked = sorted(sources, key=lambda s: -s[1])
    keep = 1
    while keep < len(ranked) and sum(w for _, w in ranked[keep:]) > _DROP_MASS:
        keep += 1
    total = sum(w for _, w in ranked[:keep])
    return [(a, w / total) for a, w in ranked[:keep]], sum(w for _, w in ranked[keep:])


@dataclass
class _ExpertAlignment:
    experts: _Solved  # the (E, E) plan of A's experts onto B's
    sources: list[list[tuple[int, float]]]  # per B expert: (A expert, weight), weights summing to 1
    figures: dict  # report["experts"]


def _align_experts(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, keep: bool = False
) -> _ExpertAlignment:
    start = time.perf_counter()
    cost = _expert_cost(lower, upper, ctx, settings.cost)
    experts = _solve(cost, settings, "experts", keep)
    sources, dropped = zip(*(_heaviest(experts.map.sources(b)) for b in range(ctx.layout.num_experts)))
    figures = _solved_figures(experts, float(cost.diagonal().mean()), time.perf_counter() - start)
    figures["cost_proxy"] = f"sliced Wasserstein of the neuron features ({_SLICES} directions) + router rows"
    figures["dropped_mass"] = max(dropped)
    return _ExpertAlignment(experts, list(sources), figures)


def _align_expert_neurons(
    ex: _ExpertAlignment, lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings,
    on_expert, keep: bool = False,
) -> dict:
    """Aligns the neurons of every pair of experts the expert plan uses, one B expert at a time (a
    Sinkhorn neuron plan at Mixtral's size is 0.8 GB: they are not all kept), and hands each B
    expert's [(weight, A expert, alignment)] to on_expert(b, sources). Returns the figures of
    all these plans: worst case; costs are means weighted by the expert plan's mass, cost_before
    is the identity pairing of experts and of neurons (as for a dense MLP)."""
    arch, E = ctx.arch, ctx.layout.num_experts
    used: list[tuple[float, dict]] = []  # (mass, figures) of every neuron plan
    for b, src in enumerate(ex.sources):
        aligned = [(w, a, _align_mlp(lower, upper, ctx, settings, keep, pair=(a, b))) for a, w in src]
        on_expert(b, aligned)
        used += [(w / E, al.figures) for w, _, al in aligned]
    before = torch.cat([
        _identity_cost(_mlp_features(lower, _mlp_paths(arch, e)), _mlp_features(upper, _mlp_paths(arch, e)),
                       settings.cost, ctx.device)
        for e in range(E)
    ])
    every = [f for _, f in used]
    return {
        "solver": every[0]["solver"],
        "epsilon": every[0]["epsilon"],
        "plans": len(every),
        "iterations": max(f["iterations"] for f in every),
        "marginal_error": max(f["marginal_error"] for f in every),
        "converged": all(f["converged"] for f in every),
        "cost_before": float(before.mean()),
        "cost_after": sum(m * f["cost_after"] for m, f in used),
        "permutation_likeness": min(f["permutation_likeness"] for f in every),
        "seconds": sum(f["seconds"] for f in every),
        "warnings": sorted({w for f in every for w in f["warnings"]}),
    }


def _fuse_router(ex: _ExpertAlignment, lower: Block, upper: Block, ctx: BuildContext, alpha: float) -> Block:
    """Router row b (which tokens go to expert b) comes from A's rows with the weights of expert
    b's sources, so a fused expert keeps a matching fused routing."""
    name, dev = ctx.arch.router, ctx.device
    RA = lower[name].to(dev, F32)  # (E, hidden)
    aligned = torch.stack([sum(w * RA[a] for a, w in src) for src in ex.sources])
    return {name: _finish(_mix(alpha, aligned, upper[name].to(dev, F32)), upper[name])}


def _build_experts(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, alpha: float):
    ex = _align_experts(lower, upper, ctx, settings)
    out: Block = {}

    def fuse(b: int, sources: list[_Source]) -> None:
        out.update(_fuse_mlp(sources, lower, upper, ctx, alpha, expert=b))

    mlp = _align_expert_neurons(ex, lower, upper, ctx, settings, fuse)
    out.update(_fuse_router(ex, lower, upper, ctx, alpha))
    return out, {"experts": ex.figures, "mlp": mlp}


def _expert_matrices(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings) -> dict:
    ex = _align_experts(lower, upper, ctx, settings, keep=True)
    pairs = {}

    def store(b: int, sources: list[_Source]) -> None:
        pairs.update({(a, b): {"cost": al.solved.cost.cpu(), "plan": al.solved.plan.cpu()} for _, a, al in sources})

    mlp = _align_expert_neurons(ex, lower, upper, ctx, settings, store, keep=True)
    return {"cost": ex.experts.cost.cpu().double(), "plan": ex.experts.plan.cpu().double(),
            "expert_pairs": pairs, "report": {**ex.figures, "neurons": mlp}}


# ---------------------------------------------------------------------------------------------
# corrected mode: the block


def _known_names(arch: Architecture, layout: HeadLayout) -> set[str]:
    names = {p + s for p in arch.projections.values() for s in (".weight", ".bias")}
    names |= {n for role in arch.experts for n in arch.role_tensors(role, layout)}
    names |= {arch.router} if arch.router else set()
    return names | set(arch.norms) | set(arch.head_norms)


def _average_rest(lower: Block, upper: Block, done: Block, ctx: BuildContext, alpha: float, notes: list[str]) -> Block:
    """Norms, head norms and o_proj's bias are averaged: the residual dimension is not
    transported. Anything unknown is averaged too, and said so."""
    rest = [n for n in upper if n not in done]
    known = _known_names(ctx.arch, ctx.layout)
    for name in rest:
        if name not in known:
            notes.append(f"{name}: no alignment rule for this tensor; averaged")
    return average_blocks({n: lower[n] for n in rest}, {n: upper[n] for n in rest}, alpha, ctx.device)


def _build_corrected(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, alpha: float):
    notes: list[str] = []
    attention = _align_attention(lower, upper, ctx, settings)
    out = _fuse_attention(attention, upper, ctx, alpha)
    report = {"attention": attention.figures}
    del attention
    if ctx.arch.experts:
        fused, figures = _build_experts(lower, upper, ctx, settings, alpha)
        out.update(fused)
        report.update(figures)
    else:
        mlp = _align_mlp(lower, upper, ctx, settings)
        out.update(_fuse_mlp([(1.0, None, mlp)], lower, upper, ctx, alpha))
        report["mlp"] = mlp.figures
        del mlp
    out.update(_average_rest(lower, upper, out, ctx, alpha, notes))
    report["notes"] = notes
    return out, report


# ---------------------------------------------------------------------------------------------
# reference mode (METHOD.md section 1)


def _reference_plan(WA: torch.Tensor, WB: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The published per-tensor plan: raw Euclidean cost between rows, POT default Sinkhorn,
    reg 0.06, fp32. Returns the cost C and plan T, both (n_A, n_B), and the plan's figures."""
    start = time.perf_counter()
    C = cost_matrix(WA, WB, "euclidean")
    T, report = sinkhorn_reference(C, REFERENCE_REG, REFERENCE_MAX_ITER, REFERENCE_STOP_THR, what)
    mass = float(T.sum())  # 1 unless the kernel underflowed
    cost_after = float(torch.dot(T.reshape(-1), C.reshape(-1)) / mass) if mass > 0 else None
    seconds = time.perf_counter() - start
    figures = _figures(report, float(C.diagonal().mean()), cost_after, permutation_likeness(T), seconds)
    figures["mass"] = mass
    return C, T, figures


def _reference_summary(plans: dict[str, dict]) -> dict:
    """Worst case over a group's per-tensor plans (costs: mean, as they are in different units)."""
    figs = list(plans.values())
    after = [f["cost_after"] for f in figs]
    return {
        "solver": figs[0]["solver"],
        "epsilon": figs[0]["epsilon"],
        "iterations": max(f["iterations"] for f in figs),
        "marginal_error": max(f["marginal_error"] for f in figs),
        "converged": all(f["converged"] for f in figs),
        "cost_before": sum(f["cost_before"] for f in figs) / len(figs),
        "cost_after": None if None in after else sum(after) / len(after),
        "permutation_likeness": min(f["permutation_likeness"] for f in figs),
        "seconds": sum(f["seconds"] for f in figs),
        "warnings": sorted({w for f in figs for w in f["warnings"]}),
        "plans": plans,
    }


def _reference_pass(lower: Block, upper: Block, ctx: BuildContext, alpha: float, keep: bool = False):
    """Everything the published script computes: fused tensors, per-tensor figures, notes and,
    with keep, per-tensor {"cost", "plan"}."""
    arch, dev = ctx.arch, ctx.device
    out: Block = {}
    figs: dict[str, dict] = {}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    notes: list[str] = []

    def fuse_role(role: str, right: torch.Tensor | None = None) -> torch.Tensor:
        name = arch.weight(role)
        WA = lower[name].to(dev, F32)
        if right is not None:
            # (out, hidden) @ (hidden, hidden): A's input columns transported by T_o, unnormalised as published
            WA = WA @ right
        WB = upper[name].to(dev, F32)
        C, T, figs[name] = _reference_plan(WA, WB, f"reference plan of {name}")
        if keep:
            kept[name] = {"cost": C.cpu(), "plan": T.cpu()}
        del C
        out[name] = _finish(_mix(alpha, T.T @ WA, WB), upper[name])  # aligned = T^T W_A, no marginal correction
        bias = arch.bias(role)
        if bias in upper:
            P = barycentric_map(T)
            out[bias] = _finish(_mix(alpha, P @ lower[bias].to(dev, F32), upper[bias].to(dev, F32)), upper[bias])
            notes.append(f"{bias}: no published rule; moved with the {name} plan as a barycentric map (corrected rule)")
        return T

    for role in ("q", "k", "v"):
        fuse_role(role)
    T_o = fuse_role("o")  # (hidden, hidden): couples o_proj's output rows, i.e. residual dims
    fuse_role("gate", right=T_o)
    fuse_role("up", right=T_o)
    fuse_role("down")
    for name in arch.norms:
        wA, wB = lower[name].to(dev, F32), upper[name].to(dev, F32)
        if "post_attention_layernorm" in name:
            wA = wA @ (0.5 * T_o + 0.5 * torch.eye(T_o.shape[0], device=dev))  # (hidden,) @ (hidden, hidden)
        out[name] = _finish(_mix(alpha, wA, wB), upper[name])
    for name in arch.head_norms:
        notes.append(f"{name}: no published rule; averaged (corrected rule)")
    for role in ("o", "down"):
        if arch.bias(role) in upper:
            notes.append(f"{arch.bias(role)}: no published rule; averaged (corrected rule)")
    if alpha != 0.5:
        notes.append(f"alpha {alpha} replaces the published 1/2 mix")
    out.update(_average_rest(lower, upper, out, ctx, alpha, notes))
    return out, figs, kept, notes


def _build_reference(lower: Block, upper: Block, ctx: BuildContext, alpha: float):
    out, figs, _, notes = _reference_pass(lower, upper, ctx, alpha)
    arch = ctx.arch
    report = {
        "attention": _reference_summary({arch.weight(r): figs[arch.weight(r)] for r in ("q", "k", "v", "o")}),
        "mlp": _reference_summary({arch.weight(r): figs[arch.weight(r)] for r in ("gate", "up", "down")}),
        "notes": notes,
    }
    return out, report


def _reference_matrices(lower: Block, upper: Block, ctx: BuildContext, group: str) -> dict:
    _, figs, kept, _ = _reference_pass(lower, upper, ctx, 0.5, keep=True)
    roles = ("q", "k", "v", "o") if group == "attention" else ("gate", "up", "down")
    names = [ctx.arch.weight(r) for r in roles]
    tensors = {n: kept[n] for n in names}
    return {**tensors[names[0]], "tensors": tensors, "report": _reference_summary({n: figs[n] for n in names})}
