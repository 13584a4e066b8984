"""LESA (Yang et al., "LESA: Learnable LLM Layer Scaling-Up", arXiv 2502.13794): a new layer's
projection weights are predicted from its two neighbours in the SVD space of the whole stack.

Per weight type (q, k, v, o, gate, up, down), one at a time:
  1. the L base layers' weights W_l (out, in) side by side, one thin SVD:
        [W_0, ..., W_{L-1}] = U S [V_0, ..., V_{L-1}]     U (out, r), S (r,), V_l (r, in)
     so every layer has its own block V_l of the right factor and shares U and S;
     r = min(out, L * in), the full thin rank (recipe `lesa.rank` keeps fewer components;
     numerically zero components are dropped, see stack_svd, which gets the factors from the
     Gram matrix instead of an SVD of the (out, L * in) matrix: same result, less memory, faster);
  2. an MLP (Linear-ReLU-Linear-ReLU-Linear, hidden 256) maps ONE ROW i of the neighbours'
     blocks, [V_{l-1}[i], V_{l+1}[i]] (2 * in,), to the same row of the middle block V_l[i]
     (in,). Training rows: every i < r and every l = 1 .. L-2, i.e. r * (L-2) samples;
     AdamW (lr 1e-3, torch's default weight decay 0.01), batch 64, 10 epochs, loss
     (1 - 5e-4) * MSE + 5e-4 * (||pred||_F - ||target||_F)^2 over the batch;
  3. the layer between base layers k and k+1: V_new = MLP([V_k, V_{k+1}]) row by row, and
     W_new = U S V_new.
These details follow the authors' released code (github.com/yangyifei729/LESA, train_LESA.ipynb);
the paper's summary (SVD of the side-by-side weights, an MLP predicting V from the neighbours'
V) agrees with it, and where they could differ the code wins here.

Everything else in a new block (input/post-attention norms, Qwen2's q/k/v biases, Qwen3's
q_norm/k_norm) is copied. The authors' code starts every new layer as a copy of base layer 0 and
replaces only the seven projection weights, so the default `copy_from: first` copies layer 0's
tensors; `lower` / `upper` copy the new layer's neighbour k or k+1 instead. Nothing is
zero-initialised by default (the paper zero-inits nothing).

Choices of ours where the code is silent: the predictor is initialised, and its batches drawn,
from `lesa.seed` inside a forked RNG (global RNG state untouched; deterministic on CPU);
`lesa.steps` can replace the epoch budget (10 epochs of a small model are only a few dozen
steps), and the manifest warns when a predictor ends no better than predicting zero; the
factors are computed on the job's device (Gram matrix in float64, V in float32) and each
predicted weight is cast back to its source dtype. Only the predicted weights of the requested
positions are kept between prepare() and build(); each weight type's factors and predictor are
freed before the next. Peak memory: one float32 copy of a weight type's whole stack (V), the
(out, out) float64 Gram matrix, one layer in float64, plus the predicted weights of every new
layer until they are written.

What the method can promise (tests/methods/test_lesa.py): a stack of equal layers is reproduced (the
inputs at any position are training inputs). A stack varying linearly with depth,
W_l = A + l B, is NOT recovered exactly at the midpoint A + (k + 1/2) B: the predictor learns
from triples two layers apart, (l-1, l+1) -> l, and is then asked about neighbours one layer
apart, inputs it never saw. Between interior layers it lands at about 0.3 of a neighbour's
distance from the midpoint; at the ends of the stack, where the pair is also an extrapolation
in depth, it does worse.
"""

from __future__ import annotations

from ...architectures import PROJECTION_ROLES
from ...errors import OptDeusError, UsageError
from ..base import Block, BuildContext, Decisions, JobView, Method, Progress
from .settings import LesaSettings


class LesaMethod(Method):
    name = "lesa"
    needs_upper = True
    default_zero_init = ()  # the paper zero-inits nothing
    needs_finite = True  # one SVD of the whole stack: a NaN anywhere spoils every layer
    settings = {"lesa": LesaSettings}

    def __init__(self, lesa: LesaSettings = LesaSettings()):
        self.lesa = lesa
        self._weights: dict[int, Block] = {}  # base position k -> predicted projection weights
        self._first: Block = {}  # base layer 0's other tensors, for copy_from "first"
        self._figures: dict = {}  # short projection name -> training figures; "warnings"

    def check(self, job: JobView) -> Decisions:
        arch = job.source.arch
        if arch.fused:  # LESA reads one weight type across all layers; fused tensors would need splitting first
            raise UsageError(
                f"method lesa does not support {arch.model_type}'s fused projections yet; "
                "use copy, average, stack or opt-deus"
            )
        if job.base_layers < 3:
            raise UsageError(
                f"recipe {job.recipe.source}: LESA learns from layer triples (l-1, l, l+1) and needs "
                f"at least 3 base layers; this model has {job.base_layers}"
            )
        return Decisions()

    def prepare(self, job: JobView, progress: Progress | None = None) -> list[str]:
        from .predictor import predict_role

        s, source, arch = self.lesa, job.source, job.source.arch
        L = job.base_layers
        positions = sorted({layer.sources[0] for layer in job.layers if layer.is_new})
        self._weights, self._figures = {k: {} for k in positions}, {}
        weight_names = {arch.weight(role) for role in PROJECTION_ROLES}
        if s.copy_from == "first":
            prefix = arch.layer_prefix(0)
            self._first = {rel: source.ckpt.read(prefix + rel) for rel in source.blocks[0] if rel not in weight_names}
        for done, role in enumerate(PROJECTION_ROLES):
            short = arch.projection_short_name(role)
            if progress:
                progress(f"lesa: {short} (SVD of {L} layers, predictor)", done, len(PROJECTION_ROLES))
            rel = arch.weight(role)
            names = [arch.layer_prefix(l) + rel for l in range(L)]
            predicted, self._figures[short] = predict_role(
                [source.ckpt.read(n) for n in names], names, positions, s, job.device, job.dtype
            )
            for k, weight in predicted.items():
                self._weights[k][rel] = weight
        # An undertrained predictor (e.g. the authors' 10 epochs on a small model: few steps)
        # predicts noise; say so in the manifest rather than let the numbers hide it.
        weak = [short for short, f in self._figures.items() if f["rank"] and f["train_mse_last"] >= f["train_mse_zero"]]
        if weak:  # one predictor per weight type serves every new layer: said once, not per layer
            return [
                f"lesa: predictor no better than predicting zero for {', '.join(weak)} (training MSE >= the "
                "targets' mean square): those weights are mostly noise; raise lesa.steps or lesa.epochs"
            ]
        return []

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        assert upper is not None
        k = ctx.sources[0]
        if k not in self._weights:
            raise OptDeusError(f"LESA: no prediction for the layer after base layer {k}; prepare(job) must run first")
        others = {"first": self._first, "lower": lower, "upper": upper}[self.lesa.copy_from]
        block = {}
        for rel in lower:
            block[rel] = self._weights[k][rel] if rel in self._weights[k] else others[rel].clone()
        source = {"first": "base layer 0", "lower": f"base layer {k}", "upper": f"base layer {k + 1}"}[
            self.lesa.copy_from
        ]
        notes = [
            "projection weights: U S V_pred, V_pred predicted by the per-weight-type MLP from the SVD "
            f"right factors of base layers {k} and {k + 1} (LESA, arXiv 2502.13794)",
            f"norms and biases (all non-projection tensors) copied from {source} (lesa.copy_from = "
            f"{self.lesa.copy_from!r}; the authors' code copies layer 0)",
        ]
        return block, {"lesa": dict(self._figures), "notes": notes}  # "lesa": figures per weight type
