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

What the method can promise (tests/test_lesa.py): a stack of equal layers is reproduced (the
inputs at any position are training inputs). A stack varying linearly with depth,
W_l = A + l B, is NOT recovered exactly at the midpoint A + (k + 1/2) B: the predictor learns
from triples two layers apart, (l-1, l+1) -> l, and is then asked about neighbours one layer
apart, inputs it never saw. Between interior layers it lands at about 0.3 of a neighbour's
distance from the midpoint; at the ends of the stack, where the pair is also an extrapolation
in depth, it does worse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..architectures import PROJECTION_ROLES
from ..errors import OptDeusError, UsageError
from .base import Block, BuildContext

if TYPE_CHECKING:
    from ..upscale import Job

COPY_FROM = ("first", "lower", "upper")


@dataclass(frozen=True)
class LesaSettings:
    """The recipe's `lesa:` block. Defaults are the authors' (see the module docstring)."""

    hidden: int = 256  # width of the predictor's hidden layers
    layers: int = 3  # Linear layers in the predictor (ReLU between); 1 = a linear predictor
    epochs: int = 10  # passes over the r * (L-2) training rows ...
    steps: int | None = None  # ... or exactly this many optimiser steps instead
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default, which the authors' code uses
    norm_loss: float = 5e-4  # weight of the batch-norm matching term in the loss
    rank: int | None = None  # singular components kept; None = all (the authors' choice)
    copy_from: str = "first"  # where norms and biases come from: base layer 0, or neighbour k or k+1
    seed: int = 0

    def validate(self, where: str) -> "LesaSettings":
        def positive_int(key: str, optional: bool = False, minimum: int = 1) -> None:
            value = getattr(self, key)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UsageError(f"{where}: lesa.{key} must be a whole number >= {minimum}{' or null' if optional else ''}, got {value!r}")

        for key in ("hidden", "layers", "epochs", "batch_size"):
            positive_int(key)
        positive_int("steps", optional=True)
        positive_int("rank", optional=True)
        positive_int("seed", minimum=0)
        for key, low, high in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("norm_loss", 0.0, 1.0)):
            value = getattr(self, key)
            ok = isinstance(value, float) and math.isfinite(value)  # the recipe parser makes YAML ints floats
            ok = ok and (low < value if key == "lr" else low <= value) and value <= high
            if not ok:
                bounds = "a positive number" if key == "lr" else f"a number in [{low:g}, {high:g}]" if high < math.inf else "a number >= 0"
                raise UsageError(f"{where}: lesa.{key} must be {bounds}, got {value!r}")
        if self.copy_from not in COPY_FROM:
            raise UsageError(f"{where}: lesa.copy_from must be one of {', '.join(COPY_FROM)}, got {self.copy_from!r}")
        return self


def stack_svd(weights: list[torch.Tensor], rank: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The thin SVD [W_0 .. W_{L-1}] (out, L * in) = U S [V_0 .. V_{L-1}], returned as
    (U S (out, r), V (r, L, in)) in float32.

    Computed through the Gram matrix G = sum_l W_l W_l^T = U S^2 U^T (out, out) in float64, then
    V_l = S^-1 U^T W_l layer by layer: the same factors as an SVD of the stacked matrix (up to
    signs), without ever building it (out * L * in floats) and an order of magnitude faster on
    CPU. float64 keeps the squared condition number harmless; components more than 1e6 times
    below the largest are numerically zero (their V rows are not determined by the weights and
    add nothing to any W_l) and are dropped."""
    out, d = weights[0].shape
    gram = torch.zeros(out, out, dtype=torch.float64, device=device)
    for w in weights:
        w = w.to(device, torch.float64)
        gram.addmm_(w, w.T)
    eigvals, U = torch.linalg.eigh(gram)  # ascending
    S = eigvals.flip(0).clamp_min(0).sqrt()
    U = U.flip(1)
    r = int((S > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
    r = r if rank is None else min(rank, r)
    U, S = U[:, :r], S[:r]
    V = torch.empty(r, len(weights), d, dtype=torch.float32, device=device)
    for l, w in enumerate(weights):
        V[:, l] = (U.T @ w.to(device, torch.float64) / S[:, None]).float()
    return (U * S).float(), V


def make_predictor(d: int, hidden: int, layers: int) -> nn.Sequential:
    """(batch, 2 d) -> (batch, d): Linear, then (ReLU, Linear) * (layers - 1)."""
    widths = [2 * d] + [hidden] * (layers - 1) + [d]
    modules: list[nn.Module] = []
    for i in range(layers):
        if i:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*modules)


def _rows(V: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sample s = (middle layer l = 1 + s // r, row i = s % r): x = [V_{l-1}[i], V_{l+1}[i]]
    (n, 2 in), y = V_l[i] (n, in). Gathered per batch: the (r * (L-2), 2 in) inputs are never built."""
    r = V.shape[0]
    l, i = 1 + idx // r, idx % r
    return torch.cat([V[i, l - 1], V[i, l + 1]], dim=1), V[i, l]


def _mse(model: nn.Module, V: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """Over all training rows: MSE of the predictor, and for scale the MSE of two trivial
    predictors, the mean of the neighbours' rows and zero (= the targets' mean square)."""
    r, L, d = V.shape
    n = r * (L - 2)
    err = mean_err = zero_err = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = _rows(V, torch.arange(start, min(n, start + chunk), device=V.device))
            err += (model(x) - y).pow(2).sum().item()
            mean_err += ((x[:, :d] + x[:, d:]) / 2 - y).pow(2).sum().item()
            zero_err += y.pow(2).sum().item()
    return {"model": err / (n * d), "neighbour_mean": mean_err / (n * d), "zero": zero_err / (n * d)}


def train_predictor(V: torch.Tensor, s: LesaSettings) -> tuple[nn.Sequential, dict]:
    """Fit the MLP predicting V_l's rows from V_{l-1}'s and V_{l+1}'s. V: (r, L, in), L >= 3."""
    r, L, d = V.shape
    n = r * (L - 2)
    steps = s.steps if s.steps is not None else s.epochs * math.ceil(n / s.batch_size)
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG
        torch.manual_seed(s.seed)
        model = make_predictor(d, s.hidden, s.layers)
    model = model.to(V.device)
    order = torch.Generator().manual_seed(s.seed)  # the batches, as a shuffling DataLoader draws them
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    first = _mse(model, V)
    perm, pos = torch.randperm(n, generator=order), 0
    for _ in range(steps):
        if pos >= n:  # a new epoch
            perm, pos = torch.randperm(n, generator=order), 0
        x, y = _rows(V, perm[pos : pos + s.batch_size].to(V.device))
        pos += s.batch_size
        pred = model(x)
        loss = (1 - s.norm_loss) * (pred - y).pow(2).mean() + s.norm_loss * (pred.norm() - y.norm()).pow(2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    last = _mse(model, V)["model"]
    if not math.isfinite(last):
        raise OptDeusError(f"LESA: the predictor's training diverged (loss {last}); lower lesa.lr")
    return model, {"rank": r, "train_rows": n, "steps": steps, "train_mse_first": first["model"],
                   "train_mse_last": last, "train_mse_neighbour_mean": first["neighbour_mean"],
                   "train_mse_zero": first["zero"]}


class LesaMethod:
    name = "lesa"
    needs_upper = True
    default_zero_init: tuple[str, ...] = ()  # the paper zero-inits nothing

    def __init__(self, settings: LesaSettings = LesaSettings()):
        self.settings = settings
        self._weights: dict[int, Block] = {}  # base position k -> predicted projection weights
        self._first: Block = {}  # base layer 0's other tensors, for copy_from "first"
        self._figures: dict = {}  # short projection name -> training figures; "warnings"

    def prepare(self, job: "Job", progress: Callable[[str, int, int], None] | None = None) -> None:
        s, arch = self.settings, job.arch
        if arch.fused:  # LESA reads one weight type across all layers; fused tensors would need splitting first
            raise UsageError(f"method lesa does not support {arch.model_type}'s fused projections yet; "
                             "use copy, average, stack or opt-deus")
        L = job.base_layers
        if L < 3:
            raise UsageError(f"recipe {job.recipe.source}: LESA learns from layer triples (l-1, l, l+1) and needs "
                             f"at least 3 base layers; this model has {L}")
        positions = sorted({layer.sources[0] for layer in job.layers if layer.is_new})
        self._weights, self._figures = {k: {} for k in positions}, {}
        weight_names = {arch.weight(role) for role in PROJECTION_ROLES}
        if s.copy_from == "first":
            prefix = arch.layer_prefix(0)
            self._first = {rel: job.ckpt.read(prefix + rel) for rel in job.blocks[0] if rel not in weight_names}
        for done, role in enumerate(PROJECTION_ROLES):
            short = arch.projection_short_name(role)
            if progress:
                progress(f"lesa: {short} (SVD of {L} layers, predictor)", done, len(PROJECTION_ROLES))
            self._figures[short] = self._predict_role(job, role, positions)
        # An undertrained predictor (e.g. the authors' 10 epochs on a small model: few steps)
        # predicts noise; say so in the manifest rather than let the numbers hide it.
        weak = [short for short, f in self._figures.items() if f["rank"] and f["train_mse_last"] >= f["train_mse_zero"]]
        if weak:
            self._figures["warnings"] = [
                f"predictor no better than predicting zero for {', '.join(weak)} (training MSE >= the "
                "targets' mean square): those weights are mostly noise; raise lesa.steps or lesa.epochs"]

    def _predict_role(self, job: "Job", role: str, positions: list[int]) -> dict:
        """SVD + predictor for one weight type; keeps only the predicted weights (source dtype, CPU)."""
        t0 = time.perf_counter()
        rel = job.arch.weight(role)
        weights = [job.ckpt.read(job.arch.layer_prefix(l) + rel) for l in range(job.base_layers)]
        for l, w in enumerate(weights):  # one bad layer would spoil every layer's factors
            if not torch.isfinite(w).all():
                raise OptDeusError(f"tensor {job.arch.layer_prefix(l) + rel} contains NaN or Inf; LESA's SVD of "
                                   "the whole stack needs every layer finite (even with --allow-nonfinite)")
        dtype = weights[0].dtype
        US, V = stack_svd(weights, self.settings.rank, job.device)  # (out, r), (r, L, in)
        del weights
        if V.shape[0] == 0:  # every layer's weight is zero: so is the new one
            for k in positions:
                self._weights[k][rel] = torch.zeros(US.shape[0], V.shape[2], dtype=dtype)
            return {"rank": 0, "seconds": round(time.perf_counter() - t0, 4)}
        model, figures = train_predictor(V, self.settings)
        with torch.no_grad():
            for k in positions:
                V_new = model(torch.cat([V[:, k], V[:, k + 1]], dim=1))  # (r, in)
                self._weights[k][rel] = (US @ V_new).to(dtype).cpu()  # (out, in)
        figures = {key: (float(f"{v:.6g}") if isinstance(v, float) else v) for key, v in figures.items()}
        figures["seconds"] = round(time.perf_counter() - t0, 4)
        return figures

    def build(self, lower: Block, upper: Block | None, ctx: BuildContext) -> tuple[Block, dict]:
        assert upper is not None
        k = ctx.sources[0]
        if k not in self._weights:
            raise OptDeusError(f"LESA: no prediction for the layer after base layer {k}; prepare(job) must run first")
        others = {"first": self._first, "lower": lower, "upper": upper}[self.settings.copy_from]
        block = {}
        for rel in lower:
            block[rel] = self._weights[k][rel] if rel in self._weights[k] else others[rel].clone()
        source = {"first": "base layer 0", "lower": f"base layer {k}", "upper": f"base layer {k + 1}"}[self.settings.copy_from]
        notes = [
            "projection weights: U S V_pred, V_pred predicted by the per-weight-type MLP from the SVD "
            f"right factors of base layers {k} and {k + 1} (LESA, arXiv 2502.13794)",
            f"norms and biases (all non-projection tensors) copied from {source} (lesa.copy_from = "
            f"{self.settings.copy_from!r}; the authors' code copies layer 0)",
        ]
        return block, {"lesa": dict(self._figures), "notes": notes}  # "lesa": figures per weight type
