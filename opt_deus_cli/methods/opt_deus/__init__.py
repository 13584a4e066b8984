"""OpT-DeUS: the new layer is the upper neighbour B fused with the lower neighbour A after A's
neurons have been aligned onto B's by optimal transport.

Two semantics (docs/method.md):
- "corrected" (default, section 2): the residual dimension is never transported; attention is
  aligned KV group -> query heads within the group -> value dims within the KV head, with
  the o_proj columns following; the MLP uses ONE plan for gate rows, up rows (and biases) and
  down columns; plans are applied as barycentric maps; fused = alpha * aligned(A) + (1 - alpha) * B;
  norms are alpha-weighted averages: alpha * A + (1 - alpha) * B.
- "reference" (section 1): the published script, tensor by tensor, with its known defects.

The package, read in this order: settings (what a recipe may say), plans (a solved plan as a
map, its figures), attention, mlp, experts (mixture of experts: corrected mode only, the
published script has no rule for them), corrected (the block), reference, matrices (the
inspection path). Zero-initialising o_proj / down_proj is the pipeline's job: the tensors
returned here are the fused ones. Importing this module imports no torch.
"""

from __future__ import annotations

from ...errors import OptDeusError
from ..base import Block, BuildContext, Decisions, Fusion, JobView, Method, Progress
from .settings import PUBLISHED, AlignmentSettings, ReferenceSolver, refuse_reference_experts

REFERENCE_WARNING = (
    "opt-deus reference mode reproduces the published script with its known defects "
    "(unnormalised transport halves q/k/v/gate/up, q/k and gate/up get independent plans, "
    "heads and GQA groups are ignored; docs/method.md section 1); use mode: corrected unless "
    "you are reproducing the paper"
)


class OptDeusMethod(Method):
    name = "opt-deus"
    needs_upper = True
    default_zero_init = ("o_proj", "down_proj")
    supports_experts = True  # corrected mode only; reference mode refuses them (see check)
    guards_memory = True  # cost matrices and the solver's workspace (memory.guard)
    needs_finite = True  # a cost matrix with NaN has no alignment
    settings = {"fusion": Fusion, "alignment": AlignmentSettings}

    def __init__(
        self,
        alignment: AlignmentSettings = AlignmentSettings(),
        fusion: Fusion = Fusion(),
        reference_solver: ReferenceSolver = PUBLISHED,
    ):
        self.alignment = alignment
        self.alpha = fusion.alpha
        self.reference_solver = reference_solver

    def check(self, job: JobView) -> Decisions:
        """Refusals from metadata alone, so --dry-run and `recipes MODEL` say them too: reference
        mode on experts, and a job whose new layers would not fit the memory budget. Decides
        whether a layer's MLP assignment may be solved beside its attention (the memory guard)."""
        from .memory import guard

        refuse_reference_experts(self.alignment, job.source.arch)
        # the published solver holds dense float32 plans, as the entropic one does
        return Decisions(
            overlap=guard(job, "sinkhorn" if self.alignment.mode == "reference" else self.alignment.solver)
        )

    def prepare(self, job: JobView, progress: Progress | None = None) -> list[str]:
        return [REFERENCE_WARNING] if self.alignment.mode == "reference" else []

    def composition(self, sources: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
        return ((sources[0], self.alpha), (sources[1], 1.0 - self.alpha))  # aligned lower, upper

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        if upper is None:
            raise OptDeusError("opt-deus builds a layer from two neighbours; it cannot follow the top layer")
        refuse_reference_experts(self.alignment, ctx.arch)
        from .blocks import check_blocks

        check_blocks(lower, upper, ctx.arch, ctx.layout)
        if self.alignment.mode == "reference":
            from .reference import build_reference

            return build_reference(lower, upper, ctx, self.alpha, self.reference_solver)
        from .corrected import build_corrected

        return build_corrected(lower, upper, ctx, self.alignment, self.alpha)
