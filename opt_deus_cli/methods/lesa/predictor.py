"""LESA's numerical core: the stack SVD, the predictor MLP and its training, and the predicted
weights of one weight type (see the package docstring for the method)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ...errors import OptDeusError
from .settings import LesaSettings


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
    return model, {
        "rank": r,
        "train_rows": n,
        "steps": steps,
        "train_mse_first": first["model"],
        "train_mse_last": last,
        "train_mse_neighbour_mean": first["neighbour_mean"],
        "train_mse_zero": first["zero"],
    }


def predict_role(
    weights: list[torch.Tensor],
    names: list[str],
    positions: list[int],
    settings: LesaSettings,
    device: torch.device,
    out_dtype: torch.dtype | None = None,
) -> tuple[dict[int, torch.Tensor], dict]:
    """SVD + predictor for one weight type, given every base layer's weight (`names` for messages):
    the predicted weight of the layer after each position k (source dtype, CPU), and figures."""
    t0 = time.perf_counter()
    for name, w in zip(names, weights):  # one bad layer would spoil every layer's factors
        if not torch.isfinite(w).all():
            raise OptDeusError(
                f"tensor {name} contains NaN or Inf; LESA's SVD of "
                "the whole stack needs every layer finite (even with --allow-nonfinite)"
            )
    dtype = out_dtype or weights[0].dtype  # stored as the output will be: no detour through bf16
    US, V = stack_svd(weights, settings.rank, device)  # (out, r), (r, L, in)
    del weights
    if V.shape[0] == 0:  # every layer's weight is zero: so is the new one
        zero = {k: torch.zeros(US.shape[0], V.shape[2], dtype=dtype) for k in positions}
        return zero, {"rank": 0, "seconds": round(time.perf_counter() - t0, 4)}
    model, figures = train_predictor(V, settings)
    predicted = {}
    with torch.no_grad():
        for k in positions:
            V_new = model(torch.cat([V[:, k], V[:, k + 1]], dim=1))  # (r, in)
            predicted[k] = (US @ V_new).to(dtype).cpu()  # (out, in)
    figures = {key: (float(f"{v:.6g}") if isinstance(v, float) else v) for key, v in figures.items()}
    figures["seconds"] = round(time.perf_counter() - t0, 4)
    return predicted, figures
