"""Reference mode: the published script (docs/method.md section 1), tensor by tensor, with its
known defects kept: raw Euclidean costs, POT's default Sinkhorn in float32, T^T W_A without the
marginal correction, independent plans for q/k and gate/up, heads and GQA groups ignored."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...ot import barycentric_map, cost_matrix, permutation_likeness
from ...solvers import sinkhorn_reference
from ..base import Block, BuildContext
from .blocks import F32, average_rest, mix
from .plans import figures, worst_of
from .settings import ReferenceSolver

# on_plan(tensor name, cost C, plan T): what the inspection path keeps; both (n_A, n_B)
OnPlan = Callable[[str, torch.Tensor, torch.Tensor], None]
# A plan with less total mass than this moved (almost) nothing: its Gibbs kernel exp(-C / reg)
# underflowed in float32 (raw costs of a few units with reg 0.06), so T^T W_A is ~0.
NO_MASS = 1e-6


def underflow_warning(roles: list[str], alpha: float) -> str:
    """What an underflowed plan means for the fused tensors, in one line."""
    names = "/".join(roles)
    return (
        f"the {names} plan{'s have' if len(roles) > 1 else ' has'} no mass (kernel underflow); with the published "
        f"semantics the fused {names} {'are' if len(roles) > 1 else 'is'} {1 - alpha:g} x the upper layer"
    )


def reference_plan(
    WA: torch.Tensor, WB: torch.Tensor, solver: ReferenceSolver, what: str
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The published per-tensor plan: raw Euclidean cost between rows, POT default Sinkhorn, fp32.
    Returns the cost C and plan T, both (n_A, n_B), and the plan's figures."""
    start = time.perf_counter()
    C = cost_matrix(WA, WB, "euclidean")
    T, report = sinkhorn_reference(C, solver.reg, solver.max_iter, solver.stop_thr, what)
    mass = float(T.sum())  # 1 unless the kernel underflowed
    cost_after = float(torch.dot(T.reshape(-1), C.reshape(-1)) / mass) if mass >= NO_MASS else None
    seconds = time.perf_counter() - start
    figs = figures(report, float(C.diagonal().mean()), cost_after, permutation_likeness(T), seconds)
    figs["mass"] = mass
    figs["underflow"] = mass < NO_MASS
    return C, T, figs


def reference_summary(plans: dict[str, dict], roles: dict[str, str], alpha: float) -> dict:
    """Worst case over a group's per-tensor plans (costs: mean, as they are in different units).
    roles: tensor name -> its role (q, k, ...). Plans without mass are said first, with what they
    mean for the fused tensors (`underflow` lists their roles); the solver's own words about them
    ("numerical errors at iteration 0") are then noise and are left in the per-plan figures."""
    figs = list(plans.values())
    after = [f["cost_after"] for f in figs]
    empty = [roles[name] for name, f in plans.items() if f.get("underflow")]
    summary = worst_of(figs)
    others = sorted({w for name, f in plans.items() if not f.get("underflow") for w in f["warnings"]})
    summary["warnings"] = ([underflow_warning(empty, alpha)] if empty else []) + others
    return {
        "solver": figs[0]["solver"],
        "epsilon": figs[0]["epsilon"],
        **summary,
        "underflow": empty,
        "cost_before": sum(f["cost_before"] for f in figs) / len(figs),
        "cost_after": None if None in after else sum(after) / len(after),
        "permutation_likeness": min(f["permutation_likeness"] for f in figs),
        "seconds": sum(f["seconds"] for f in figs),
        "plans": plans,
    }


def reference_pass(
    lower: Block, upper: Block, ctx: BuildContext, alpha: float, solver: ReferenceSolver, on_plan: OnPlan | None = None
) -> tuple[Block, dict[str, dict], list[str]]:
    """Everything the published script computes: fused tensors, per-tensor figures, notes."""
    arch, dev = ctx.arch, ctx.device
    out: Block = {}
    figs: dict[str, dict] = {}
    notes: list[str] = []

    def fuse_role(role: str, right: torch.Tensor | None = None) -> torch.Tensor:
        name = arch.weight(role)
        WA = lower[name].to(dev, F32)
        if right is not None:
            # (out, hidden) @ (hidden, hidden): A's input columns transported by T_o, unnormalised as published
            WA = WA @ right
        WB = upper[name].to(dev, F32)
        C, T, figs[name] = reference_plan(WA, WB, solver, f"reference plan of {name}")
        if on_plan is not None:
            on_plan(name, C, T)
        del C
        out[name] = ctx.result(mix(alpha, T.T @ WA, WB), upper[name])  # aligned = T^T W_A, no marginal correction
        bias = arch.bias(role)
        if bias in upper:
            P = barycentric_map(T)
            out[bias] = ctx.result(mix(alpha, P @ lower[bias].to(dev, F32), upper[bias].to(dev, F32)), upper[bias])
            notes.append(f"{bias}: no published rule; moved with the {name} plan as a barycentric map (corrected rule)")
        return T

    for role in ("q", "k", "v"):
        fuse_role(role)
    T_o = fuse_role("o")  # (hidden, hidden): couples o_proj's output rows, i.e. residual dims
    fuse_role("gate", right=T_o)
    fuse_role("up", right=T_o)
    fuse_role("down")
    for name in arch.norms:
        wA, wB = lower[name].to(dev, F32), upper[name].to(dev, F32)
        if name == arch.mlp_input_norm:  # the published rule for the norm that feeds the MLP, on its
            # effective scale (gemma stores 1 + w): (hidden,) @ (hidden, hidden)
            offset = arch.norm_offset
            wA = (wA + offset) @ (0.5 * T_o + 0.5 * torch.eye(T_o.shape[0], device=dev)) - offset
        out[name] = ctx.result(mix(alpha, wA, wB), upper[name])
    for name in arch.head_norms:
        notes.append(f"{name}: no published rule; averaged (corrected rule)")
    for role in ("o", "down"):
        if arch.bias(role) in upper:
            notes.append(f"{arch.bias(role)}: no published rule; averaged (corrected rule)")
    if alpha != 0.5:
        notes.append(f"alpha {alpha} replaces the published 1/2 mix")
    out.update(average_rest(lower, upper, out, ctx, alpha, notes))
    return out, figs, notes


def group_report(figs: dict[str, dict], ctx: BuildContext, group: str, alpha: float) -> dict:
    roles = ("q", "k", "v", "o") if group == "attention" else ("gate", "up", "down")
    names = {ctx.arch.weight(r): r for r in roles}
    return reference_summary({name: figs[name] for name in names}, names, alpha)


def build_reference(
    lower: Block, upper: Block, ctx: BuildContext, alpha: float, solver: ReferenceSolver
) -> tuple[Block, dict]:
    out, figs, notes = reference_pass(lower, upper, ctx, alpha, solver)
    return out, {
        "attention": group_report(figs, ctx, "attention", alpha),
        "mlp": group_report(figs, ctx, "mlp", alpha),
        "notes": notes,
    }
