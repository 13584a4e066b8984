"""Optimal-transport building blocks: cost matrices, plan solvers and the barycentric map.

Everything here is device-agnostic torch code except the exact solver, which is scipy's
`linear_sum_assignment` on a CPU float64 array. A plan T (n, m) couples the n units (rows,
heads, KV groups) of the lower layer A with the m units of the upper layer B; with uniform
marginals every row of T carries mass 1/n and every column 1/m.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import OptDeusError
from .methods.opt_deus.settings import COST_KINDS, SOLVERS


# Cost matrices are built tile by tile so that bf16 inputs are converted to the compute dtype
# one tile at a time: at LLaMA-8B shapes the MLP features are 14336 x 12288 (700 MB in fp32
# per layer) and are never materialised.
_TILE = 2048
# Exact medians of very large cost matrices are slow (a full selection over 2e8 entries takes
# ~10 s); above this many entries the median is taken over a fixed strided sample.
_MEDIAN_SAMPLE = 1 << 24
# Sinkhorn runs in float64 when the cost is small enough for that to be cheap (32 MB).
_SINKHORN_FP64_MAX = 1 << 22
# A plan whose total mass is off by more than this is reported as degraded (not converged).
_MASS_TOL = 1e-3


@dataclass(frozen=True)
class PlanReport:
    """What a solver did. `converged` is False whenever the plan may be degraded: the iteration
    cap was hit, the solver hit a numerical error, or mass was lost."""

    solver: str
    epsilon: float  # 0.0 for the exact (unregularised) solver
    iterations: int
    marginal_error: float  # max of the L1 violations of the row and column marginals
    converged: bool
    seconds: float
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


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
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
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
    if kind not in COST_KINDS:
        raise OptDeusError(f"unknown cost {kind!r}; expected one of {', '.join(COST_KINDS)}")
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
    # bf16 weights (the usual checkpoint dtype) are multiplied as bf16 on the CPU: exact products
    exact_bf16 = device.type == "cpu" and dtype == torch.float32 and all(t.dtype == torch.bfloat16 for t in (*Xs, *Ys))
    with _bf16_products(exact_bf16):
        for i in range(0, n, _TILE):
            xs = tile(Xs, i, min(i + _TILE, n))
            x_norm = sq_norms(xs)
            for j in range(0, m, _TILE):
                ys = tile(Ys, j, min(j + _TILE, m))
                dot = xs[0] @ ys[0].T  # (tile_n, tile_m)
                for xt, yt in zip(xs[1:], ys[1:]):
                    dot.addmm_(xt, yt.T)
                yn = y_norm[j : j + dot.shape[1]]
                if kind == "cosine":
                    denom = (x_norm.sqrt()[:, None] * yn.sqrt()[None, :]).clamp_min_(torch.finfo(dtype).tiny)
                    block = dot.div_(denom).neg_().add_(1.0)
                else:
                    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y, clamped: rounding can make it slightly negative
                    block = dot.mul_(-2.0).add_(x_norm[:, None]).add_(yn[None, :]).clamp_min_(0.0)
                    if kind == "euclidean":
                        block = block.sqrt_()
                out[i : i + block.shape[0], j : j + block.shape[1]] = block
    return out


def typical_cost(cost: torch.Tensor) -> float:
    """Median of the cost (mean if the median is 0, 1 if both are): the unit epsilon is relative to.
    Above 2^24 entries the median of a fixed strided sample is used (same answer to ~1e-3)."""
    flat = cost.reshape(-1)
    if flat.numel() > _MEDIAN_SAMPLE:
        flat = flat[:: flat.numel() // _MEDIAN_SAMPLE + 1]
    scale = float(flat.median())
    if scale <= 0:
        scale = float(cost.mean())
    return scale if scale > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# solvers


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. min/max propagate NaN and expose +-Inf, in one pass without the
    full-size temporaries of torch.isfinite (|t| and a mask: +1 GB on an 8B-shape float64 cost)."""
    if t.numel() == 0:
        return True
    lo, hi = t.aminmax()
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise OptDeusError(f"{what} contains NaN or Inf; the input weights are corrupt or the solver diverged")


def exact_assignment(cost: torch.Tensor, what: str = "cost matrix") -> tuple[torch.Tensor, PlanReport]:
    """Minimum-cost perfect matching of a square cost (n, n): returns col (n,) int64 on CPU with
    row i of A matched to column col[i] of B (the plan is T[i, col[i]] = 1/n), and a report.
    A CPU float64 cost is used in place; anything else is copied to one (scipy needs that)."""
    n, m = cost.shape
    if n != m:
        raise OptDeusError(f"{what}: the exact solver needs a square cost matrix, got {n} x {m}")
    _check_finite(cost, what)
    start = time.perf_counter()
    dense = np.ascontiguousarray(cost.detach().to("cpu", torch.float64))
    try:  # LAPJV: same optimum as scipy, but tens of times faster on the weakly related costs of
        import lap  # real adjacent layers (scipy: 280 s at n = 8192, lap: 5 s)

        _, col, _ = lap.lapjv(dense, extend_cost=False)
    except ImportError:
        _, col = linear_sum_assignment(dense)  # rows come back 0..n-1
    report = PlanReport("exact", 0.0, 0, 0.0, True, time.perf_counter() - start)
    return torch.from_numpy(col).long(), report


def assignment_plan(col: torch.Tensor, dtype=torch.float64, device=None) -> torch.Tensor:
    """Dense plan (n, n) of an assignment from `exact_assignment`: T[i, col[i]] = 1/n."""
    n = col.numel()
    T = torch.zeros((n, n), dtype=dtype, device=device)
    T[torch.arange(n, device=device), col.to(device)] = 1.0 / n
    return T


def _pot_sinkhorn(
    M: torch.Tensor, reg: float, method: str, max_iter: int, tol: float, solver: str, what: str
) -> tuple[torch.Tensor, PlanReport]:
    """POT Sinkhorn with uniform marginals on M's device and dtype; POT's warnings are captured
    into the report instead of being printed."""
    n, m = M.shape
    a = torch.full((n,), 1.0 / n, dtype=M.dtype, device=M.device)
    b = torch.full((m,), 1.0 / m, dtype=M.dtype, device=M.device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import ot as pot  # here, not at the top: importing POT costs ~1.5 s that copy recipes need not pay

        T, log = pot.sinkhorn(a, b, M, reg, method=method, numItermax=max_iter, stopThr=tol, log=True)
    seconds = time.perf_counter() - start
    _check_finite(T, f"{what}: transport plan")
    # POT stops when the column-marginal error (checked every 10 iterations) is below tol;
    # anything else (iteration cap, numerical-error exit) leaves the last error above it.
    last_err = float(log["err"][-1]) if log.get("err") else math.inf
    marginal_error = max(float((T.sum(1) - a).abs().sum()), float((T.sum(0) - b).abs().sum()))
    mass_ok = abs(float(T.sum()) - 1.0) <= _MASS_TOL
    messages = tuple(dict.fromkeys(str(w.message) for w in caught))
    report = PlanReport(
        solver, float(reg), int(log["niter"]) + 1, marginal_error, bool(last_err < tol and mass_ok), seconds, messages
    )
    return T, report


def sinkhorn_plan(
    cost: torch.Tensor, epsilon: float, max_iter: int, tol: float, what: str = "cost matrix"
) -> tuple[torch.Tensor, PlanReport]:
    """Log-domain entropic OT (POT `sinkhorn_log`) of the cost divided by `typical_cost`, so that
    epsilon is scale-free. Returns T (n, m) in the cost's dtype and device."""
    _check_finite(cost, what)
    # exp(-(C / s) / eps) = exp(-C / (eps * s)): the raw cost with reg eps * s saves an n x m copy
    scale = typical_cost(cost)
    work = torch.float64 if cost.numel() <= _SINKHORN_FP64_MAX else cost.dtype
    T, report = _pot_sinkhorn(cost.to(work), epsilon * scale, "sinkhorn_log", max_iter, tol, "sinkhorn", what)
    return T.to(cost.dtype), replace(report, epsilon=float(epsilon))


def sinkhorn_reference(
    cost: torch.Tensor, reg: float = 0.06, max_iter: int = 10000, stop_thr: float = 1e-9, what: str = "cost matrix"
) -> tuple[torch.Tensor, PlanReport]:
    """The published solver: POT `ot.sinkhorn` default method (Sinkhorn-Knopp, not log-domain) on
    the raw cost in float32. It can underflow; that shows as converged False and mass < 1."""
    _check_finite(cost, what)
    return _pot_sinkhorn(cost.to(torch.float32), reg, "sinkhorn", max_iter, stop_thr, "sinkhorn-reference", what)


def solve_plan(
    cost: torch.Tensor,
    solver: str = "exact",
    epsilon: float = 0.05,
    max_iter: int = 2000,
    tol: float = 1e-6,
    what: str = "cost matrix",
) -> tuple[torch.Tensor, PlanReport]:
    """Plan T (n, m) for a cost matrix, on the cost's device. exact: a permutation matrix / n
    (float64); sinkhorn: entropic plan in the cost's dtype. NaN/Inf raise OptDeusError."""
    if solver == "exact":
        col, report = exact_assignment(cost, what)
        return assignment_plan(col, device=cost.device), report
    if solver == "sinkhorn":
        return sinkhorn_plan(cost, epsilon, max_iter, tol, what)
    raise OptDeusError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")


# ---------------------------------------------------------------------------------------------
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
