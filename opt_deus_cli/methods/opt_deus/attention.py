"""Corrected mode, attention: KV groups are aligned as wholes, then within a matched pair of
groups the query heads and the value dims; the o_proj columns follow both. No permutation ever
happens inside a q/k head dimension (RoPE pairs and the q.k product must survive)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...architectures import Architecture, HeadLayout
from ...ot import cost_matrix
from ..base import Block, BuildContext
from .blocks import F32, mix
from .plans import Map, Solved, solve, worst_of
from .settings import AlignmentSettings


@dataclass
class Heads:
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
    def of(cls, block: Block, arch: Architecture, layout: HeadLayout, device: torch.device) -> "Heads":
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


def head_features(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(r, D): per query head, its q rows (in order: RoPE pairs are not permuted), q bias, o columns."""
    r = parts["q"].shape[0]
    cols = [parts["q"].reshape(r, -1)] + ([parts["qb"]] if "qb" in parts else []) + [parts["o"].reshape(r, -1)]
    return torch.cat(cols, 1)


def parts_cost(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], kind: str) -> float:
    """The cost between two units made of several tensors (a KV group: q, k, v, o, biases) as if
    each were flattened and concatenated, without building the concatenation, and without the
    |x|^2 + |y|^2 - 2 x.y cancellation for the distances."""
    if kind == "cosine":
        dot = sum(float(torch.vdot(x[k].reshape(-1), y[k].reshape(-1))) for k in y)
        norms = sum(float(x[k].square().sum()) for k in y) * sum(float(y[k].square().sum()) for k in y)
        return 1.0 - dot / norms**0.5 if norms > 0 else 1.0
    sq = sum(float(torch.dist(x[k], y[k])) ** 2 for k in y)
    return sq if kind == "sqeuclidean" else sq**0.5


def align_group(parts: dict[str, torch.Tensor], heads: Map, vdims: Map, o_vdims_moved: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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
class GroupPair:
    """The inner plans of one pair (group a of A, group b of B), with their small costs."""

    v_dims: Solved
    heads: Solved
    v_cost: torch.Tensor  # (d, d)
    head_cost: torch.Tensor  # (r, r), with the v-dim map applied to A's o columns


@dataclass
class AttentionAlignment:
    A: Heads
    B: Heads
    pairs: dict[tuple[int, int], GroupPair]  # (group of A, group of B) -> inner plans
    group: Solved
    group_cost: torch.Tensor  # (G, G)
    figures: dict


def align_attention(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings) -> AttentionAlignment:
    start = time.perf_counter()
    A = Heads.of(lower, ctx.arch, ctx.layout, ctx.device)
    B = Heads.of(upper, ctx.arch, ctx.layout, ctx.device)
    G, kind = ctx.layout.num_kv_heads, settings.cost
    # Inner plans for every pair of groups: value dims first (their features do not depend on
    # the head matching), then query heads with the o columns already moved by the v-dim map.
    # The group cost is the cost of the whole group a, aligned by those plans, against group b.
    parts_A = [A.group(g) for g in range(G)]
    parts_B = [B.group(g) for g in range(G)]
    v_feats_A = [A.v_features(g) for g in range(G)]
    v_feats_B = [B.v_features(g) for g in range(G)]
    head_feats_B = [head_features(p) for p in parts_B]
    pairs: dict[tuple[int, int], GroupPair] = {}
    group_cost = torch.empty((G, G), dtype=torch.float64)
    for a in range(G):
        for b in range(G):
            where = f"KV group {a} -> {b}"
            v_cost = cost_matrix(v_feats_A[a], v_feats_B[b], kind)  # (d, d)
            vd = solve(v_cost, settings, f"attention value dims, {where}")
            o_moved = vd.map.apply(parts_A[a]["o"], 1)
            head_cost = cost_matrix(head_features({**parts_A[a], "o": o_moved}), head_feats_B[b], kind)  # (r, r)
            hd = solve(head_cost, settings, f"attention query heads, {where}")
            pairs[a, b] = GroupPair(vd, hd, v_cost, head_cost)
            group_cost[a, b] = parts_cost(align_group(parts_A[a], hd.map, vd.map, o_moved), parts_B[b], kind)
    cost_before = sum(parts_cost(parts_A[g], parts_B[g], kind) for g in range(G)) / G
    group = solve(group_cost.to(ctx.device), settings, "attention KV groups")
    used = {(a, b): w / G for b in range(G) for a, w in group.map.sources(b)}  # mass of the KV-group plan

    def level(inner: dict[tuple[int, int], Solved]) -> dict:
        """The many small inner plans of one level: worst case over all of them, and their
        permutation likeness weighted by how much the fusion uses each pair of groups."""
        return {"plans": len(inner), **worst_of([s.status() for s in inner.values()]),
                "permutation_likeness": sum(w * inner[pair].likeness for pair, w in used.items())}

    inner_v = {pair: p.v_dims for pair, p in pairs.items()}
    inner_h = {pair: p.heads for pair, p in pairs.items()}
    figures = group.figures(cost_before, time.perf_counter() - start)
    # top-level figures cover every plan of the group: the worst case of all levels
    figures.update(worst_of([s.status() for s in (group, *inner_v.values(), *inner_h.values())]))
    figures["levels"] = {
        "kv_groups": group.figures(cost_before, group.report.seconds),
        "query_heads": level(inner_h),
        "v_dims": level(inner_v),
    }
    return AttentionAlignment(A, B, pairs, group, group_cost, figures)


def fuse_attention(al: AttentionAlignment, upper: Block, ctx: BuildContext, alpha: float) -> Block:
    """New group b = alpha * sum_a P_G[b, a] * (group a aligned by the (a, b) plans) + (1 - alpha) * B's group b."""
    G = ctx.layout.num_kv_heads
    fused_groups = []
    for b in range(G):
        target = al.B.group(b)
        aligned = None
        for a, w in al.group.map.sources(b):
            pair = al.pairs[a, b]
            moved = align_group(al.A.group(a), pair.heads.map, pair.v_dims.map)
            weighted = {k: w * t for k, t in moved.items()}
            aligned = weighted if aligned is None else {k: aligned[k] + weighted[k] for k in weighted}
        fused_groups.append({k: mix(alpha, aligned[k], target[k]) for k in target})
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
    return {name: ctx.result(t, upper[name]) for name, t in out.items()}
