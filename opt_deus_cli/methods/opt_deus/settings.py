"""What a recipe may say about OpT-DeUS alignment, and the published solver's fixed settings.
Imports no torch (the recipe parser reads these)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ...errors import UsageError
from ...ot_names import COST_KINDS, SOLVERS
from ...settings import check_settings, setting

MODES = ("corrected", "reference")


@dataclass(frozen=True)
class AlignmentSettings:
    """How OpT-DeUS aligns the lower layer onto the upper one (the recipe's `alignment:` block).

    mode: "corrected" (docs: the project's alignment, default) or "reference" (the published
    script, which uses its own fixed solver settings, ReferenceSolver). solver "exact" is a
    permutation (linear assignment), "sinkhorn" entropic OT; cost compares the features of two
    units. epsilon is the entropic regularisation relative to the spread of the cost that
    transport sees (the RMS of the doubly-centred cost, docs/method.md 2.5), so it depends
    neither on the scale of the weights nor on the units' norms; 0.05 gives plans close to the
    exact one (permutation likeness ~0.8 on real adjacent layers). Sinkhorn stops after max_iter
    iterations or when the L2 norm of its column-marginal violation is below tol (POT's
    stopThr), whichever comes first; only the latter counts as converged (the barycentric map
    divides by the column sums, so that violation does not reach the fused weights).
    sketch: K compares MLP neurons through a K-dimensional random projection of their features
    (n^2 K products instead of n^2 D for the cost; see ot.sketch_features); None: full features.
    """

    mode: str = setting("corrected", choices=MODES)
    solver: str = setting("exact", choices=SOLVERS)
    cost: str = setting("sqeuclidean", choices=COST_KINDS)
    epsilon: float = setting(0.05, above=0.0)
    max_iter: int = setting(2000, minimum=1)
    tol: float = setting(1e-4, above=0.0)
    sketch: int | None = setting(None, minimum=8, doc="MLP neuron features projected on this many random directions")

    def __post_init__(self):
        check_settings(self)

    def unused(self) -> dict[str, str]:
        """Fields this mode and solver ignore -> why (settings.parse_settings refuses them in a recipe)."""
        if self.mode == "reference":
            why = (
                f"mode reference runs the published solver with its fixed settings (POT Sinkhorn on the raw "
                f"Euclidean cost, reg {PUBLISHED.reg}, {PUBLISHED.max_iter} iterations, stop {PUBLISHED.stop_thr:g})"
            )
            return {f.name: why for f in fields(self) if f.name != "mode"}
        if self.solver == "exact":
            why = "solver exact (an assignment) has no regularisation or iterations (they are for solver: sinkhorn)"
            return {name: why for name in ("epsilon", "max_iter", "tol")}
        return {}


@dataclass(frozen=True)
class ReferenceSolver:
    """The published script's solver: POT `ot.sinkhorn` (Sinkhorn-Knopp) on the raw Euclidean
    cost in float32 with these settings. Fixed by the paper; a benchmark may pass a capped copy
    to extrapolate the run time."""

    reg: float = 0.06
    max_iter: int = 10000
    stop_thr: float = 1e-9


PUBLISHED = ReferenceSolver()


def refuse_reference_experts(settings: AlignmentSettings, arch) -> None:
    """The published script has no rule for mixture-of-experts layers."""
    if settings.mode == "reference" and arch.experts:
        raise UsageError(
            f"opt-deus reference mode reproduces the published script, which has no rule for "
            f"mixture-of-experts layers ({arch.model_type}); use alignment mode: corrected"
        )
