"""Corrected mode, attention: KV groups are aligned as wholes, then within a matched pair of
groups the query heads and the value dims; the o_proj columns follow both. No permutation ever
happens inside a q/k head dimension (RoPE pairs and the q.k product must survive)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...architectures import Architecture, HeadLayout
from ...ot import batched_cost, finish_cost, paired_cost
from ..base import Block, BuildContext
from .blocks import F32, mix
from .plans import Map, Solved, solve, solve_batch, worst_of
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
    def of(cls, block: Block, arch: Architecture, layout: HeadLayout, device: torch.device) -> Heads:
        G, r, d, h = layout.num_kv_heads, layout.heads_per_group, layout.head_dim, layout.hidden

        def get(name: str, *shape: int) -> torch.Tensor:
            return block[name].to(device, F32).reshape(shape)

        def optional(name: str, *shape: int) -> torch.Tensor | None:  # a bias
            return get(name, *shape) if name in block else None

        return cls(
            q=get(arch.weight("q"), G, r, d, h),
            k=get(arch.weight("k"), G, d, h),
            v=get(arch.weight("v"), G, d, h),
            # o_proj (h, H*d): its transpose lists the columns head by head, dim by dim
            o=block[arch.weight("o")].to(device, F32).T.reshape(G, r, d, h),
            qb=optional(arch.bias("q"), G, r, d),
            kb=optional(arch.bias("k"), G, d),
            vb=optional(arch.bias("v"), G, d),
        )

    def groups(self) -> dict[str, torch.Tensor]:
        """The tensors of all KV groups: q, o (G, r, d, h), k, v (G, d, h), qb (G, r, d), kb, vb (G, d)."""
        parts = {"q": self.q, "qb": self.qb, "k": self.k, "kb": self.kb, "v": self.v, "vb": self.vb, "o": self.o}
        return {k: t for k, t in parts.items() if t is not None}

    def group(self, g: int) -> dict[str, torch.Tensor]:
        """The tensors of KV group g (views): q, o (r, d, h), k, v (d, h), qb (r, d), kb, vb (d,)."""
        return {k: t[g] for k, t in self.groups().items()}

    def v_features(self, g: int) -> torch.Tensor:
        """(d, 2h [+1]): per value dim, its v row, its bias, and the sum over the group's query heads
        of the o_proj column it feeds (a sum, so that it does not depend on the head matching)."""
        cols = [self.v[g]] + ([self.vb[g][:, None]] if self.vb is not None else []) + [self.o[g].sum(0)]
        return torch.cat(cols, 1)


def head_costs(a: dict[str, torch.Tensor], o_moved: torch.Tensor, B: Heads, kind: str) -> torch.Tensor:
    """(G, r, r): the cost between the query heads of group a (its parts, o columns moved by each
    of the G v-dim maps: o_moved (G, r, d, h)) and those of every group b of B. A head's features
    are its q rows (in order: RoPE pairs are not permuted), q bias and o columns; they are never
    concatenated: the dot products are summed part by part, A's q part against all of B's groups
    in one product."""
    G, r = o_moved.shape[:2]

    def shared(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x (r, K) . y (G, r, K) -> (G, r, r)
        return (x.reshape(r, -1) @ y.reshape(G * r, -1).T).reshape(r, G, r).transpose(0, 1)

    dot = shared(a["q"], B.q) + torch.bmm(o_moved.reshape(G, r, -1), B.o.reshape(G, r, -1).transpose(1, 2))
    a_norm = a["q"].reshape(r, -1).square().sum(1) + o_moved.reshape(G, r, -1).square().sum(2)  # (G, r)
    b_norm = B.q.reshape(G, r, -1).square().sum(2) + B.o.reshape(G, r, -1).square().sum(2)
    if "qb" in a:
        assert B.qb is not None  # both blocks have the same tensors (check_blocks)
        dot = dot + shared(a["qb"], B.qb)
        a_norm, b_norm = a_norm + a["qb"].square().sum(1), b_norm + B.qb.square().sum(2)
    return finish_cost(dot, a_norm, b_norm, kind)


def stacked_parts_cost(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(N,) float64: the cost between units made of several tensors (a KV group: q, k, v, o,
    biases; each (N, ...), or broadcastable to it) as if each were flattened and concatenated,
    without building the concatenation, and without the |x|^2 + |y|^2 - 2 x.y cancellation for
    the distances."""

    def total(f) -> torch.Tensor:  # f over every (broadcast) entry of every part, summed per unit in float64
        shape = {k: torch.broadcast_shapes(x[k].shape, y[k].shape) for k in y}
        return sum(f(x[k], y[k]).expand(shape[k]).flatten(1).sum(1, dtype=torch.float64) for k in y)

    return paired_cost(total, kind)


def move_each(maps: list[Map], W: torch.Tensor, dim: int) -> torch.Tensor:
    """W (N, ...) with W[k] moved along `dim` (counted after the batch dimension) by maps[k];
    pass W.expand(N, ...) to move one tensor by every map. Index maps gather (no arithmetic),
    entropic maps multiply."""
    axis, N = dim + 1, len(maps)
    indexes = [m.index for m in maps if m.index is not None]
    if len(indexes) == N:  # one gather per map straight into the result
        shape = list(W.shape)
        shape[axis] = indexes[0].numel()
        out = W.new_empty(shape)
        for k, index in enumerate(indexes):
            torch.index_select(W[k], dim, index.to(W.device), out=out[k])
        return out
    P = torch.stack([m.weights() for m in maps]).to(W.device, W.dtype)  # (N, m, n)
    rows = W.movedim(axis, -1)[..., None, :]  # (N, ..., 1, n)
    Pt = P.transpose(1, 2).reshape(N, *([1] * (rows.dim() - 3)), P.shape[2], P.shape[1])  # (N, 1.., n, m)
    return (rows @ Pt).squeeze(-2).movedim(-1, axis)


def align_group(
    parts: dict[str, torch.Tensor], heads: list[Map], vdims: list[Map], o_vdims_moved: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Group a's tensors moved onto the slots of N groups at once, (N, ...) each: query heads by
    heads[k], value dims by vdims[k] (v rows, v bias and the matching o columns of every head);
    k is never permuted inside. o_vdims_moved: (N, r, d, h), parts["o"] already moved by vdims
    (the maps act on different axes and commute)."""
    N = len(heads)

    def each(t: torch.Tensor) -> torch.Tensor:
        return t.expand(N, *t.shape)

    moved = o_vdims_moved if o_vdims_moved is not None else move_each(vdims, each(parts["o"]), 1)
    out = {k: each(t) for k, t in parts.items()}
    out["q"] = move_each(heads, each(parts["q"]), 0)
    out["o"] = move_each(heads, moved, 0)
    out["v"] = move_each(vdims, each(parts["v"]), 0)
    if "qb" in parts:
        out["qb"] = move_each(heads, each(parts["qb"]), 0)
    if "vb" in parts:
        out["vb"] = move_each(vdims, each(parts["vb"]), 0)
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
    # Inner plans for every pair of groups (a, b), in batches (pair a*G + b): value dims first,
    # all G^2 at once (their features do not depend on the head matching), then, per group a,
    # query heads against every group b, with the o columns already moved by the (a, b) v-dim
    # map. The group cost is the cost of the whole group a, aligned by those plans, against b.
    parts_A, parts_B = [A.group(g) for g in range(G)], B.groups()  # parts_B: (G, ...) each
    v_feats_A = torch.stack([A.v_features(g) for g in range(G)])  # (G, d, 2h [+1])
    v_feats_B = torch.stack([B.v_features(g) for g in range(G)])
    v_cost = batched_cost(v_feats_A[:, None], v_feats_B[None], kind)  # (G, G, d, d)
    v_dims = solve_batch(v_cost.flatten(0, 1), settings, "attention value dims")
    v_maps = [s.map for s in v_dims]
    head_costs_of, heads, group_costs_of = [], [], []  # per group a of A
    for a in range(G):  # group a against every group b at once
        maps = v_maps[a * G : (a + 1) * G]
        o_moved = move_each(maps, parts_A[a]["o"].expand(G, *parts_A[a]["o"].shape), 1)  # (G, r, d, h)
        head_costs_of.append(head_costs(parts_A[a], o_moved, B, kind))  # (G, r, r)
        solved = solve_batch(head_costs_of[-1], settings, "attention query heads")
        heads += solved
        aligned = align_group(parts_A[a], [s.map for s in solved], maps, o_moved)
        group_costs_of.append(stacked_parts_cost(aligned, parts_B, kind))
        del o_moved, aligned
    head_cost, group_cost = (
        torch.stack(head_costs_of),
        torch.stack(group_costs_of).cpu(),
    )  # (G, G, r, r), (G, G) float64
    cost_before = float(stacked_parts_cost(A.groups(), parts_B, kind).mean())
    group = solve(group_cost, settings, "attention KV groups")  # (G, G) on the CPU: too small for a device
    used = {(a, b): w / G for b in range(G) for a, w in group.map.sources(b)}  # mass of the KV-group plan
    pairs = {
        (a, b): GroupPair(v_dims[a * G + b], heads[a * G + b], v_cost[a, b], head_cost[a, b])
        for a in range(G)
        for b in range(G)
    }

    def level(inner: dict[tuple[int, int], Solved]) -> dict:
        """The many small inner plans of one level: worst case over all of them, and their
        permutation likeness weighted by how much the fusion uses each pair of groups."""
        return {
            "plans": len(inner),
            **worst_of([s.status() for s in inner.values()]),
            "permutation_likeness": sum(w * inner[pair].likeness for pair, w in used.items()),
        }

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
            moved = align_group(al.A.group(a), [pair.heads.map], [pair.v_dims.map])
            weighted = {k: w * t[0] for k, t in moved.items()}
            aligned = weighted if aligned is None else {k: aligned[k] + weighted[k] for k in weighted}
        assert aligned is not None  # every group of B receives mass
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
