"""What a recipe may say about OpT-DeUS alignment, and the published solver's fixed settings.
Imports no torch (the recipe parser reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UsageError
from ...settings import check_settings, setting

MODES = ("corrected", "reference")
SOLVERS = ("exact", "sinkhorn")
COST_KINDS = ("euclidean", "sqeuclidean", "cosine")


@dataclass(frozen=True)
class AlignmentSettings:
    """How OpT-DeUS aligns the lower layer onto the upper one (the recipe's `alignment:` block).

    mode: "corrected" (docs: the project's alignment, default) or "reference" (the published
    script, which uses its own fixed solver settings, ReferenceSolver). solver "exact" is a
    permutation (linear assignment), "sinkhorn" entropic OT; cost compares the features of two
    units. epsilon is the entropic regularisation relative to the cost normalised by its median,
    so it does not depend on the scale of the weights. Sinkhorn stops after max_iter iterations
    or when the L2 norm of its column-marginal violation is below tol (POT's stopThr), whichever
    comes first; only the latter counts as converged.
    """

    mode: str = setting("corrected", choices=MODES)
    solver: str = setting("exact", choices=SOLVERS)
    cost: str = setting("sqeuclidean", choices=COST_KINDS)
    epsilon: float = setting(0.05, above=0.0)
    max_iter: int = setting(2000, minimum=1)
    tol: float = setting(1e-6, above=0.0)

    def __post_init__(self):
        check_settings(self)


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
