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

# An exact layer is "large" from this many MLP neurons on. A large layer solves its MLP assignment
# in a forked child beside attention (overlap): that pays there. A small one is built in process
# on one thread: the fork, its copy-on-write pages and attention on one core less cost more than
# the assignment they hide, and its tensors are too small for a second thread to pay its barriers
# (on a busy machine each of the hundreds of small ops waits for a preempted thread: 12x slower
# on the shipped model). Measured: python -m benchmarks.overlap_crossover (BENCHMARKS.md).
OVERLAP_MIN_NEURONS = 2048


@contextmanager
def _threads(count: int):
    """Inside: torch uses `count` threads (at least one, never more than it had). One less
    beside the assignment's child: an OpenMP team with a thread preempted by it waits at every
    barrier (attention ran 3x slower)."""
    threads = torch.get_num_threads()
    if count < threads:
        torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_corrected(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, alpha: float
) -> tuple[Block, dict]:
    """ctx.decisions.overlap: a dense MLP's cost first, its exact assignment (one core, seconds) then solved in
    a child process while attention is aligned and fused here (faster; attention's buffers join
    the cost in memory, and pages the fork shares get copied as they are written), for an MLP of
    at least OVERLAP_MIN_NEURONS. Otherwise attention first and the MLP after, in this process:
    the lower peak (OptDeusMethod.check chooses); a small exact layer, on one thread."""
    # Sinkhorn's n x n iterations and a mixture's many experts are work enough for every thread
    large = (
        ctx.layout.intermediate >= OVERLAP_MIN_NEURONS
        or settings.solver != "exact"
        or bool(ctx.arch.experts)
        or ctx.device.type != "cpu"
    )
    with _threads(torch.get_num_threads() if large else 1):
        return _build(lower, upper, ctx, settings, alpha, ctx.decisions.overlap and large)


def _build(
    lower: Block, upper: Block, ctx: BuildContext, settings: AlignmentSettings, alpha: float, overlap: bool
) -> tuple[Block, dict]:
    notes: list[str] = []
    background = overlap and settings.solver == "exact" and not ctx.arch.experts
    pending_mlp = align_mlp_later(lower, upper, ctx, settings) if background else None
    with _threads(torch.get_num_threads() - 1 if background else torch.get_num_threads()):
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
