"""Corrected mode (the default): one new block from the aligned lower layer and the upper one.
Attention and MLP are aligned on their own plans; norms, head norms, o_proj's bias and anything
without a rule are averaged (the residual dimension is never transported)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from ..base import Block, BuildContext
from .attention import align_attention, fuse_attention
from .blocks import average_rest
from .experts import build_experts
from .mlp import align_mlp, align_mlp_later, fuse_mlp
from .settings import AlignmentSettings


@contextmanager
def _one_core_less(enabled: bool):
    """Inside: torch uses one thread less, leaving a core to the assignment's child process (an
    OpenMP team with a thread preempted by it waits at every barrier: attention ran 3x slower)."""
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_corrected(lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings,
                    alpha: float) -> tuple[Block, dict]:
    """ctx.decisions.overlap: a dense MLP's cost first, its exact assignment (one core, seconds) then
    solved in a child process while attention is aligned and fused here (faster; attention's buffers
    join the cost in memory, and pages the fork shares get copied as they are written). Without it,
    attention first and the MLP after: the lower peak (OptDeusMethod.check chooses)."""
    notes: list[str] = []
    background = ctx.decisions.overlap and settings.solver == "exact" and not ctx.arch.experts
    pending_mlp = align_mlp_later(lower, upper, ctx, settings) if background else None
    with _one_core_less(background):
        attention = align_attention(lower, upper, ctx, settings)
        out = fuse_attention(attention, upper, ctx, alpha)
    report: dict[str, Any] = {"attention": attention.figures}
    del attention
    if ctx.arch.experts:
        fused, figures = build_experts(lower, upper, ctx, settings, alpha)
        out.update(fused)
        report.update(figures)
    else:
        mlp = pending_mlp() if pending_mlp is not None else align_mlp(lower, upper, ctx, settings)
        del pending_mlp  # frees the n x n cost before the fusion's float32 copies
        mlp.figures["overlapped"] = background  # solved beside attention, or after it
        out.update(fuse_mlp([(1.0, None, mlp)], lower, upper, ctx, alpha))
        report["mlp"] = mlp.figures
        del mlp
    out.update(average_rest(lower, upper, out, ctx, alpha, notes))
    report["notes"] = notes
    return out, report
