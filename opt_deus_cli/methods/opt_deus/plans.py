"""A solved transport plan as OpT-DeUS uses it: the map that moves the lower layer's units onto
the upper layer's, the figures the manifest reports, and the one worst-case reduction over many
plans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ...ot import assignment_plan, barycentric_map, permutation_likeness
from ...solvers import PlanReport, exact_assignments, exact_assignments_in_background, sinkhorn_plans
from .settings import AlignmentSettings

# An entropic plan less permutation-like than this moves averages of several units rather than
# units: said in the plan's warnings (the figure itself is in the report).
LOW_LIKENESS = 0.5
BLURRED = (
    f"plan is blurred: permutation likeness below {LOW_LIKENESS} (each new unit averages several of the "
    "lower layer's); lower alignment.epsilon or use solver: exact"
)


class Map:
    """Barycentric map of one plan, moving A's units (along some axis) onto B's units.
    index (m,): B's unit j receives A's unit index[j] (exact solver: a pure gather, no arithmetic);
    P (m, n): B's unit j receives sum_i P[j, i] * A's unit i (entropic solver); colsum (m,) the
    plan's column sums, so that the plan itself can be given back for inspection."""

    def __init__(
        self, index: torch.Tensor | None = None, P: torch.Tensor | None = None, colsum: torch.Tensor | None = None
    ):
        self.index, self.P, self.colsum = index, P, colsum

    def weights(self) -> torch.Tensor:
        """P of an entropic map."""
        assert self.P is not None, "an index map has no weights"
        return self.P

    def apply(self, W: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.index is not None:
            return W.index_select(dim, self.index.to(W.device))
        P = self.weights().to(device=W.device, dtype=W.dtype)
        return torch.tensordot(P, W, dims=([1], [dim])).movedim(0, dim)

    def sources(self, j: int) -> list[tuple[int, float]]:
        """(A unit, weight) pairs that make up B's unit j (weights sum to 1; zeros skipped)."""
        if self.index is not None:
            return [(int(self.index[j]), 1.0)]
        row = self.weights()[j]
        return [(int(i), float(row[i])) for i in torch.nonzero(row > 0).flatten()]

    def plan(self) -> torch.Tensor:
        """The transport plan T (n, m), CPU float64: T[i, j] = mass moved from A's i to B's j."""
        if self.index is not None:
            return assignment_plan(torch.argsort(self.index.cpu()))  # col[i] = B unit of A unit i
        assert self.colsum is not None
        return (self.weights().cpu().double() * self.colsum.cpu().double()[:, None]).T


@dataclass
class Solved:
    map: Map
    report: PlanReport
    cost_after: float  # mean matched cost under the plan (mass-normalised)
    likeness: float  # permutation likeness: 1 for a permutation

    def status(self) -> dict:
        return {
            "iterations": self.report.iterations,
            "marginal_error": self.report.marginal_error,
            "converged": self.report.converged,
            "warnings": list(self.report.warnings),
        }

    def figures(self, cost_before: float, seconds: float) -> dict:
        return figures(self.report, cost_before, self.cost_after, self.likeness, seconds)


def solve(cost: torch.Tensor, settings: AlignmentSettings, what: str) -> Solved:
    """Plan for `cost` (n, m) with the configured solver, as a map plus figures."""
    return solve_batch(cost[None], settings, what)[0]


def solve_later(cost: torch.Tensor, settings: AlignmentSettings, what: str) -> Callable[[], Solved]:
    """solve(), started now and finished when the returned function is called: the exact solver
    runs in a child process meanwhile (ot.exact_assignments_in_background); Sinkhorn, which uses
    every core itself, runs at once."""
    if settings.solver != "exact":
        solved = solve(cost, settings, what)
        return lambda: solved
    pending = exact_assignments_in_background(cost[None], what)

    def result() -> Solved:
        cols, reports, matched = pending()
        return Solved(Map(index=torch.argsort(cols[0])), reports[0], float(matched[0]), 1.0)

    return result


def solve_batch(costs: torch.Tensor, settings: AlignmentSettings, what: str) -> list[Solved]:
    """Plans for a batch of costs (N, n, m), one solver call for all (many small plans cost
    about what one does): the plans solve() gives one by one."""
    N = costs.shape[0]
    if settings.solver == "exact":
        cols, reports, matched = exact_assignments(costs, what)
        # col[i] = B unit of A unit i; the map needs the inverse: A unit landing on B unit j
        return [Solved(Map(index=torch.argsort(cols[k])), reports[k], float(matched[k]), 1.0) for k in range(N)]
    T, reports = sinkhorn_plans(costs, settings.epsilon, settings.max_iter, settings.tol, what)
    # mean cost under each plan, mass-normalised; a batched dot product makes no n x m temporary
    after = (
        (torch.bmm(T.reshape(N, 1, -1), costs.to(T.dtype).reshape(N, -1, 1)).reshape(N) / T.sum((1, 2))).double().cpu()
    )
    solved = []
    for k in range(N):
        likeness = permutation_likeness(T[k])
        report = (
            reports[k] if likeness >= LOW_LIKENESS else replace(reports[k], warnings=reports[k].warnings + (BLURRED,))
        )
        solved.append(Solved(Map(P=barycentric_map(T[k]), colsum=T[k].sum(0)), report, float(after[k]), likeness))
    return solved


def figures(report: PlanReport, cost_before: float, cost_after: float | None, likeness: float, seconds: float) -> dict:
    """One plan's figures as the manifest records them."""
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


def worst_of(statuses: list[dict]) -> dict:
    """The worst case over many plans' figures (or Solved.status()): most iterations, largest
    marginal error, converged only if all did, every distinct warning."""
    return {
        "iterations": max(s["iterations"] for s in statuses),
        "marginal_error": max(s["marginal_error"] for s in statuses),
        "converged": all(s["converged"] for s in statuses),
        "warnings": sorted({w for s in statuses for w in s["warnings"]}),
    }
