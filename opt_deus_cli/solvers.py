"""Plan solvers: the exact assignment (LAPJV, or scipy's `linear_sum_assignment`, on a CPU float64
array: a cost computed on a GPU is moved to the CPU once, as one array, a batch of small costs
too; optionally in a child process while the caller goes on), log-domain entropic OT (Sinkhorn
with epsilon relative to the cost's spread), and the published solver (POT's Sinkhorn-Knopp)
for the reference semantics. Solvers take batches of problems (N, n, m) so that many small plans
(attention's KV-group pairs) cost one call.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import OptDeusError
from .ot import all_finite, assignment_plan, cost_spread
from .ot_names import SOLVERS

# Sinkhorn runs in float64 when a problem is small enough for that to be cheap (32 MB).
_SINKHORN_FP64_MAX = 1 << 22
# Epsilon scaling starts the entropic solver at this many times the requested regularisation.
ANNEAL = 16
# A plan whose total mass is off by more than this is reported as degraded (not converged).
_MASS_TOL = 1e-3
# POT's words when the iteration cap is hit (kept: users search for them)
NOT_CONVERGED = (
    "Sinkhorn did not converge. You might want to increase the number of iterations "
    "`numItermax` or the regularization parameter `reg`."
)


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


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise OptDeusError(f"{what} contains NaN or Inf; the input weights are corrupt or the solver diverged")


def _lap(dense: np.ndarray) -> np.ndarray:
    """col (n,) of the minimum-cost perfect matching of a square float64 array."""
    try:  # LAPJV: same optimum as scipy, but tens of times faster on the weakly related costs of
        import lap  # real adjacent layers (scipy: 280 s at n = 8192, lap: 5 s)

        _, col, _ = lap.lapjv(dense, extend_cost=False)
    except ImportError:
        _, col = linear_sum_assignment(dense)  # rows come back 0..n-1
    return col


def _reduce(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each problem's row minima, then its column minima, in place (dense (N, n, n)):
    the optimal assignment is unchanged (a constant per row or column adds the same to every
    perfect matching), but LAPJV's column-reduction start no longer piles onto the rows of small
    norm that a squared-Euclidean cost (|a_i|^2 + |b_j|^2 - 2 a_i.b_j) favours: 2x faster on
    unrelated 1B-shape layers (4.8 -> 2.4 s; benchmarks/probes.py). Returns the offsets (N, n, 1)
    and (N, 1, n) for _restore."""
    rows = dense.min(axis=2, keepdims=True)
    dense -= rows
    cols = dense.min(axis=1, keepdims=True)
    dense -= cols
    return rows, cols


def _restore(dense: np.ndarray, offsets: tuple[np.ndarray, np.ndarray]) -> None:
    """Undo _reduce in place (the caller's cost comes back as it was, up to rounding)."""
    rows, cols = offsets
    dense += cols
    dense += rows


def exact_assignments(
    costs: torch.Tensor, what: str = "cost matrix"
) -> tuple[torch.Tensor, list[PlanReport], torch.Tensor]:
    """Minimum-cost perfect matchings of a batch of square costs (N, n, n): returns col (N, n)
    int64 on CPU, row i of A matched to column col[k, i] of B in problem k (the plan is
    T[i, col[i]] = 1/n), one report per problem, and the mean matched cost of each (N,) float64.
    The batch is moved to one CPU float64 array once (in place if it already is one)."""
    N, n, m = costs.shape
    if n != m:
        raise OptDeusError(f"{what}: the exact solver needs a square cost matrix, got {n} x {m}")
    _check_finite(costs, what)
    dense = np.ascontiguousarray(costs.detach().to("cpu", torch.float64))
    offsets = _reduce(dense)
    cols, reports = [], []
    try:
        for k in range(N):
            start = time.perf_counter()
            cols.append(torch.from_numpy(_lap(dense[k])).long())
            reports.append(PlanReport("exact", 0.0, 0, 0.0, True, time.perf_counter() - start))
    finally:
        _restore(dense, offsets)
    matched = [float(dense[k][np.arange(n), col.numpy()].mean()) for k, col in enumerate(cols)]
    return torch.stack(cols), reports, torch.tensor(matched, dtype=torch.float64)


def exact_assignments_in_background(costs: torch.Tensor, what: str = "cost matrix"):
    """exact_assignments, solved in a forked child process while this one goes on: LAPJV holds
    the GIL and one core for seconds (20 s at n = 14336 on unrelated layers), so the caller can
    use the other core meanwhile. The child sees the cost through the fork (copy-on-write: no
    copy is made) and sends back only the columns. Returns a function that waits and gives what
    exact_assignments gives; without fork (not POSIX) the work is done at once."""
    N, n, m = costs.shape
    if n != m or not hasattr(os, "fork"):
        done = exact_assignments(costs, what)
        return lambda: done
    _check_finite(costs, what)
    dense = np.ascontiguousarray(costs.detach().to("cpu", torch.float64))
    offsets = _reduce(dense)  # here, before the fork: the child only reads (no copy-on-write)
    read, write = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        _restore(dense, offsets)
        raise
    if pid == 0:  # the child: solve, send the columns, leave without running the parent's cleanup
        status = 1
        try:
            os.close(read)
            began = time.perf_counter()
            cols = np.stack([_lap(dense[k]) for k in range(N)]).astype(np.int64)
            payload = (
                np.float64(time.perf_counter() - began).tobytes() + cols.tobytes()
            )  # its own time, then the columns
            status = 0
        except BaseException as e:
            payload = f"{type(e).__name__}: {e}".encode()
        view = memoryview(payload)
        while view:
            view = view[os.write(write, view) :]
        os._exit(status)
    os.close(write)

    def result():
        with os.fdopen(read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        _restore(dense, offsets)  # the child is gone: writing no longer copies its pages
        if os.waitstatus_to_exitcode(status) != 0:
            raise OptDeusError(
                f"{what}: the assignment process failed ({payload.decode(errors='replace') or status}); "
                "if memory is short, give --memory-budget to see what a layer needs"
            )
        seconds = float(np.frombuffer(payload[:8], dtype=np.float64)[0]) / N  # the solver's, not the waiting's
        cols = np.frombuffer(payload[8:], dtype=np.int64).reshape(N, n)
        matched = torch.tensor([float(dense[k][np.arange(n), cols[k]].mean()) for k in range(N)], dtype=torch.float64)
        return (
            torch.from_numpy(cols.copy()),
            [PlanReport("exact", 0.0, 0, 0.0, True, seconds) for _ in range(N)],
            matched,
        )

    return result


def exact_assignment(cost: torch.Tensor, what: str = "cost matrix") -> tuple[torch.Tensor, PlanReport]:
    """exact_assignments of one cost (n, n): col (n,) and its report."""
    if cost.dim() != 2:
        raise OptDeusError(f"{what}: a cost matrix has 2 dimensions, got {cost.dim()}")
    cols, reports, _ = exact_assignments(cost[None], what)
    return cols[0], reports[0]


def _log_sinkhorn(M: torch.Tensor, reg: torch.Tensor, max_iter: int, tol: float):
    """Log-domain Sinkhorn (POT's `sinkhorn_log` updates, uniform marginals) on a batch M (N, n, m)
    with one reg per problem (N,), with epsilon scaling: the plan is first solved at ANNEAL
    times reg, then at half that, ..., down to reg, each stage warm-started from the last one's
    potentials (a sharp plan straight from zero potentials can take thousands of iterations).
    Every stage stops as POT does (L2 column-marginal error below tol, tested every 10th
    iteration); max_iter caps the iterations of all stages together; a stopped problem is frozen.
    Returns T (N, n, m), iterations (N,), the last error tested (N,) and whether the cap stopped
    it (N,)."""
    N, n, m = M.shape
    loga, logb = math.log(1.0 / n), math.log(1.0 / m)
    u, v = M.new_zeros((N, n)), M.new_zeros((N, m))
    done = torch.zeros(N, dtype=torch.long)
    err = torch.full((N,), math.inf, dtype=torch.float64)
    factors = [2.0**k for k in range(int(math.log2(ANNEAL)), 0, -1)] + [1.0]
    for stage, factor in enumerate(factors):
        last = stage == len(factors) - 1
        if stage:  # the same dual potentials f = reg * u in the new units
            u, v = u * (factors[stage - 1] / factor), v * (factors[stage - 1] / factor)
        Mr = M / -(reg * factor).to(M.dtype)[:, None, None]
        running = torch.ones(N, dtype=torch.bool)
        # the stages before the last share half of the budget; the last gets the rest
        for ii in range(max(0, (max_iter if last else max_iter // 2) - int(done.max()))):
            v_new = logb - torch.logsumexp(Mr + u[:, :, None], 1)
            u_new = loga - torch.logsumexp(Mr + v_new[:, None, :], 2)
            keep = running.to(M.device)[:, None]
            u, v = (u_new, v_new) if N == 1 else (torch.where(keep, u_new, u), torch.where(keep, v_new, v))
            done += running.long()
            if ii % 10 == 0:
                colsum = torch.exp(Mr + u[:, :, None] + v[:, None, :]).sum(1)  # (N, m)
                now = torch.linalg.vector_norm(colsum - 1.0 / m, dim=1).double().cpu()
                err = torch.where(running, now, err)
                running &= ~(now < tol)
                if not bool(running.any()):
                    break
        del Mr
    T = M / -reg.to(M.dtype)[:, None, None]
    return T.add_(u[:, :, None]).add_(v[:, None, :]).exp_(), done, err, running  # in place: one n x m buffer


def sinkhorn_plans(
    costs: torch.Tensor, epsilon: float, max_iter: int, tol: float, what: str = "cost matrix"
) -> tuple[torch.Tensor, list[PlanReport]]:
    """Log-domain entropic OT of a batch of costs (N, n, m), each divided by its cost_spread so
    that epsilon is scale-free and shift-invariant. Returns T (N, n, m) in the costs' dtype and
    device, and one report per problem."""
    _check_finite(costs, what)
    start = time.perf_counter()
    N, n, m = costs.shape
    # exp(-(C / s) / eps) = exp(-C / (eps * s)): the raw cost with reg eps * s saves an n x m copy
    scale = cost_spread(costs)
    work = torch.float64 if n * m <= _SINKHORN_FP64_MAX else costs.dtype
    T, niter, err, capped = _log_sinkhorn(costs.to(work), epsilon * scale, max_iter, tol)
    _check_finite(T, f"{what}: transport plan")
    seconds = (time.perf_counter() - start) / N
    rows = (T.sum(2) - 1.0 / n).abs().sum(1)
    cols = (T.sum(1) - 1.0 / m).abs().sum(1)
    marginal = torch.maximum(rows, cols).double().cpu()
    mass = T.sum((1, 2)).double().cpu()
    reports = []
    for k in range(N):
        mass_ok = abs(float(mass[k]) - 1.0) <= _MASS_TOL
        reports.append(
            PlanReport(
                "sinkhorn",
                float(epsilon),
                int(niter[k]),
                float(marginal[k]),
                bool(float(err[k]) < tol and mass_ok),
                seconds,
                (NOT_CONVERGED,) if bool(capped[k]) else (),
            )
        )
    return T.to(costs.dtype), reports


def sinkhorn_plan(
    cost: torch.Tensor, epsilon: float, max_iter: int, tol: float, what: str = "cost matrix"
) -> tuple[torch.Tensor, PlanReport]:
    """sinkhorn_plans of one cost (n, m): T (n, m) and its report."""
    T, reports = sinkhorn_plans(cost[None], epsilon, max_iter, tol, what)
    return T[0], reports[0]


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
