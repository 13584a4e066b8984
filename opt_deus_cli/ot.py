"""Optimal-transport building blocks: what each cost kind computes, cost matrices (dense, from
column blocks, batched, sketched), costs of paired units, the scale a cost has for transport, and
using a plan (the barycentric map). Device-agnostic torch code; the solvers are in solvers.py. A
plan T (n, m) couples the n units (rows, heads, KV groups) of the lower layer A with the m units
of the upper layer B; with uniform marginals every row of T carries mass 1/n and every column 1/m.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import OptDeusError
from .ot_names import COST_KINDS

# Cost matrices are built tile by tile so that bf16 inputs are converted to the compute dtype
# one tile at a time: at LLaMA-8B shapes the MLP features are 14336 x 12288 (700 MB in fp32
# per layer) and are never materialised.
_TILE = 2048


# ---------------------------------------------------------------------------------------------
# cost kinds: the one place that says what each kind computes; every cost below (and the methods'
# costs of their own shapes) asks cost_kind()


@dataclass(frozen=True)
class CostKind:
    angular: bool  # compares directions: 1 - cos(x, y), which is |x/|x| - y/|y||^2 / 2
    root: bool  # a distance rather than its square
    squared: str  # the kind without the root (itself when root is False)


_COST_KINDS = {
    "euclidean": CostKind(angular=False, root=True, squared="sqeuclidean"),
    "sqeuclidean": CostKind(angular=False, root=False, squared="sqeuclidean"),
    "cosine": CostKind(angular=True, root=False, squared="cosine"),
}  # keys: ot_names.COST_KINDS, in its order


def cost_kind(kind: str) -> CostKind:
    """What a cost kind (a recipe's `alignment.cost`) computes; OptDeusError for an unknown name."""
    if kind not in _COST_KINDS:
        raise OptDeusError(f"unknown cost {kind!r}; expected one of {', '.join(COST_KINDS)}")
    return _COST_KINDS[kind]


def finish_cost(dot: torch.Tensor, x_norm: torch.Tensor, y_norm: torch.Tensor, kind: str) -> torch.Tensor:
    """The cost of a tile (..., n, m) from the dot products and the squared norms (..., n), (..., m)."""
    spec = cost_kind(kind)
    if spec.angular:
        denom = (x_norm.sqrt()[..., :, None] * y_norm.sqrt()[..., None, :]).clamp_min_(torch.finfo(dot.dtype).tiny)
        return dot.div_(denom).neg_().add_(1.0)
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, clamped: rounding can make it slightly negative
    block = dot.mul_(-2.0).add_(x_norm[..., :, None]).add_(y_norm[..., None, :]).clamp_min_(0.0)
    return block.sqrt_() if spec.root else block


Parts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a part of x, the same part of y) -> elementwise


def paired_cost(total: Callable[[Parts], torch.Tensor], kind: str) -> torch.Tensor:
    """(N,): the cost between unit i of A and unit i of B, units made of parts that are never
    concatenated (column blocks, a KV group's tensors): total(f) sums the elementwise f(x, y) over
    every entry of every part of a unit, in the caller's dtype. Distances come from the
    differences themselves, without the |x|^2 + |y|^2 - 2 x.y cancellation."""
    spec = cost_kind(kind)
    if spec.angular:
        dot = total(lambda x, y: x * y)
        norms = total(lambda x, y: x.square()) * total(lambda x, y: y.square())
        return torch.where(norms > 0, 1.0 - dot / norms.sqrt().clamp_min(torch.finfo(dot.dtype).tiny), 1.0)
    sq = total(lambda x, y: (x - y).square())
    return sq.sqrt() if spec.root else sq


# ---------------------------------------------------------------------------------------------
# cost matrices


def _native_bf16_cpu() -> bool:
    """The CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). Without them oneDNN would
    emulate bf16 and be slower than fp32 BLAS."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, probe)():
                return True
        except Exception:  # private torch API: absent or failing means "no"
            pass
    return False


@contextmanager
def _bf16_products(enabled: bool):
    """Inside: CPU float32 matmuls may multiply in bf16 with float32 accumulation (oneDNN).
    Only for operands that are bf16 values converted to float32: their bf16 rounding is exact, the
    products of two bf16 are exact in float32, so the result is the float32 one up to summation
    order (~1e-7 relative), ~20% faster on AVX512-BF16 CPUs."""
    matmul: Any = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    old = getattr(matmul, "fp32_precision", None)
    switched = False
    if enabled and old is not None and _native_bf16_cpu():
        try:
            matmul.fp32_precision = "bf16"
            switched = True
        except Exception:  # a torch that does not know the setting: plain float32
            pass
    try:
        yield
    finally:
        if switched:
            matmul.fp32_precision = old


def _exact_bf16(device: torch.device, dtype: torch.dtype, blocks) -> bool:
    """bf16 operands multiplied as bf16 on the CPU are exact (see _bf16_products)."""
    return device.type == "cpu" and dtype == torch.float32 and all(t.dtype == torch.bfloat16 for t in blocks)


def cost_matrix(X: torch.Tensor, Y: torch.Tensor, kind: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cost between the rows of X (n, d) and Y (m, d): (n, m) on X's device, float64 if
    either input is float64 else float32 (or written into `out`, any device and dtype)."""
    return cost_matrix_blocks([X], [Y], kind, out=out)


def cost_matrix_blocks(
    Xs: list[torch.Tensor],
    Ys: list[torch.Tensor],
    kind: str,
    *,
    out: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Like `cost_matrix` for features given as column blocks: unit i of A is the concatenation
    of row i of every X in Xs (each (n, d_t), any float dtype, views such as `down.T` welcome),
    likewise for B. The concatenation is never built: the cost uses |x|^2, |y|^2 and
    x.y = sum_t X_t Y_t^T, computed tile by tile with on-the-fly conversion to the compute dtype
    on `device` (default: X's device); the result is allocated there unless `out` is given.
    """
    cost_kind(kind)  # an unknown kind fails before any work
    if len(Xs) != len(Ys) or not Xs:
        raise OptDeusError("cost_matrix_blocks needs the same number (>= 1) of blocks for A and B")
    n, m = Xs[0].shape[0], Ys[0].shape[0]
    for x, y in zip(Xs, Ys):
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != n or y.shape[0] != m or x.shape[1] != y.shape[1]:
            raise OptDeusError(f"cost blocks do not line up: {tuple(x.shape)} vs {tuple(y.shape)}")
    device = torch.device(device) if device is not None else Xs[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (*Xs, *Ys)) else torch.float32
    if out is None:
        out = torch.empty((n, m), dtype=dtype, device=device)

    def tile(blocks, lo, hi):
        return [b[lo:hi].to(device=device, dtype=dtype) for b in blocks]

    def sq_norms(blocks):
        # (rows,) squared norms of the concatenated features
        return sum((t * t).sum(1) for t in blocks)

    y_norm = torch.cat([sq_norms(tile(Ys, j, min(j + _TILE, m))) for j in range(0, m, _TILE)])
    with _bf16_products(_exact_bf16(device, dtype, (*Xs, *Ys))):
        for i in range(0, n, _TILE):
            xs = tile(Xs, i, min(i + _TILE, n))
            x_norm = sq_norms(xs)
            for j in range(0, m, _TILE):
                ys = tile(Ys, j, min(j + _TILE, m))
                dot = xs[0] @ ys[0].T  # (tile_n, tile_m)
                for xt, yt in zip(xs[1:], ys[1:]):
                    dot.addmm_(xt, yt.T)
                block = finish_cost(dot, x_norm, y_norm[j : j + dot.shape[1]], kind)
                out[i : i + block.shape[0], j : j + block.shape[1]] = block
    return out


def batched_cost(X: torch.Tensor, Y: torch.Tensor, kind: str) -> torch.Tensor:
    """(..., n, m): the cost between the rows of X (..., n, d) and of Y (..., m, d), batch
    dimensions broadcast (e.g. X (G, 1, d, D) and Y (1, G, d, D) give every pair of groups)."""
    cost_kind(kind)
    dot = X @ Y.transpose(-1, -2)
    return finish_cost(
        dot, X.square().sum(-1).expand(dot.shape[:-1]), Y.square().sum(-1).expand(dot.shape[:-2] + dot.shape[-1:]), kind
    )


SKETCH_SEED = 0  # one fixed projection: a pair of layers always gets the same plan


def sketch_features(blocks: list[torch.Tensor], k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, k) float32: the rows of the column blocks (each (n, d_t), as cost_matrix_blocks takes
    them) projected on k random directions, S = sum_t X_t R_t / sqrt(k), R with independent
    +-1 entries drawn from a fixed seed for the total width D, so that A and B get the same R.
    |S x - S y|^2 estimates |x - y|^2 with relative error ~ sqrt(2 / k) (Johnson-Lindenstrauss),
    at n * D * k instead of the n^2 * D of the full cost's products."""
    device = torch.device(device) if device is not None else blocks[0].device
    widths = [b.shape[1] for b in blocks]
    signs = torch.randint(0, 2, (sum(widths), k), generator=torch.Generator().manual_seed(SKETCH_SEED)).mul_(2).sub_(1)
    signs = signs.to(device=device, dtype=torch.float32)  # +-1: exact in bf16, so bf16 products stay exact
    n = blocks[0].shape[0]
    out = torch.empty((n, k), dtype=torch.float32, device=device)
    with _bf16_products(_exact_bf16(device, torch.float32, blocks)):
        for i in range(0, n, _TILE):
            acc = None
            for b, r in zip(blocks, signs.split(widths)):
                part = b[i : i + _TILE].to(device=device, dtype=torch.float32) @ r
                acc = part if acc is None else acc.add_(part)
            assert acc is not None  # blocks is not empty
            out[i : i + acc.shape[0]] = acc
    return out.mul_(1.0 / math.sqrt(k))


def cost_spread(cost: torch.Tensor) -> torch.Tensor:
    """(...,) float64: the scale of a cost (..., n, m) that transport can see, the RMS of the
    doubly-centred cost C - row means - column means + grand mean (docs/method.md 2.5). Adding a
    constant to a row or a column does not change a plan, nor this scale; the median of C, which
    squared-Euclidean costs inflate with the units' norms, would. 1.0 where it is 0 (every plan
    costs the same). Row chunks of a large cost are centred one at a time (no n x m copy)."""
    rows = cost.mean(-1, dtype=torch.float64)  # (..., n)
    cols = cost.mean(-2, dtype=torch.float64)  # (..., m)
    grand = rows.mean(-1, keepdim=True)
    n, m = cost.shape[-2:]
    total = torch.zeros(cost.shape[:-2], dtype=torch.float64, device=cost.device)
    step = max(1, (1 << 24) // max(m, 1))
    for i in range(0, n, step):
        centred = cost[..., i : i + step, :].double() - rows[..., i : i + step, None] - (cols - grand)[..., None, :]
        total += centred.square().sum((-2, -1))
    spread = (total / (n * m)).sqrt()
    return torch.where(spread > 0, spread, torch.ones_like(spread))


# ---------------------------------------------------------------------------------------------
# checking and using a plan


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. min/max propagate NaN and expose +-Inf, in one pass without the
    full-size temporaries of torch.isfinite (|t| and a mask: +1 GB on an 8B-shape float64 cost)."""
    if t.numel() == 0:
        return True
    lo, hi = t.aminmax()
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def assignment_plan(col: torch.Tensor, dtype=torch.float64, device=None) -> torch.Tensor:
    """Dense plan (n, n) of an assignment from `exact_assignment`: T[i, col[i]] = 1/n."""
    n = col.numel()
    T = torch.zeros((n, n), dtype=dtype, device=device)
    T[torch.arange(n, device=device), col.to(device)] = 1.0 / n
    return T


# using a plan


def barycentric_map(T: torch.Tensor) -> torch.Tensor:
    """P = diag(1/colsum(T)) T^T, shape (m, n): row j of P @ W_A is the T-weighted mean of A's
    rows sent to B's unit j. Rows of P sum to 1, so an identity (permutation) plan gives the
    identity (that permutation) whatever the plan's total mass."""
    colsum = T.sum(0)
    if not bool((colsum > 0).all()):
        empty = int((colsum <= 0).sum())
        raise OptDeusError(f"transport plan leaves {empty} of {T.shape[1]} target units with no mass; it is degenerate")
    return (T / colsum).T


def permutation_likeness(T: torch.Tensor) -> float:
    """Mean over rows of n * (largest entry of the row): 1.0 for a permutation plan, 1/m for
    the uniform (independent) plan."""
    return float((T.max(dim=1).values * T.shape[0]).mean())
