"""How much memory building one OpT-DeUS layer takes, and the guard that refuses a job which
would not fit before any work starts, naming the way out.

The largest object is the MLP's neuron cost (n x n, n = intermediate size, or an expert's):
the exact solver (LAPJV) takes it as one dense CPU float64 array, 8 n^2 bytes (1.6 GB at
LLaMA-3.1-8B's n = 14336, 6.6 GB at 70B's 28672, 22.7 GB at 405B's 53248); the entropic solver
holds it in float32 with about three more n x n buffers of its size (the scaled cost, one
log-sum-exp temporary, the plan) plus the barycentric map, on the compute device. A sketch
(alignment.sketch) makes the cost cheaper to compute, not smaller. Next to it: the two source
blocks, the new block, one float32 tensor of the block being fused (three copies at most), the
interpreter with torch, and what the CLI's reading, writing and checksums hold around the layer
(measured: benchmarks/eight_b.py, BENCHMARKS.md). That is the peak of a layer built
in order (attention, then the MLP); the faster overlapped layer (the MLP's assignment solved in
a forked child while attention runs) can hold up to twice as much, and is chosen only when the
budget allows that (guard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import UsageError
from ..base import JobView

GB = 1e9
RUNTIME = 400_000_000  # the interpreter, torch and transformers, measured ~350 MB on the CPU
SINKHORN_BUFFERS = 5  # cost, scaled cost, log-sum-exp temporary, plan, barycentric map (each n x n float32)
FUSION_COPIES = 4  # a fused tensor in float32: A's, moved, B's, the mix
PIPELINE = 250_000_000  # the CLI around a layer: checksum mappings (2 x 64 MiB), config and I/O modules


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one new layer needs at its peak, by part, on the CPU and on the compute device."""

    cpu: dict[str, int]
    device: dict[str, int]  # empty when the device is the CPU

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())


def layer_memory(job: JobView, solver: str) -> LayerMemory:
    """The estimate for the largest new layer of `job` with this solver."""
    source = job.source

    def sizes(k: int) -> tuple[int, int, int, int]:
        """Base block k: (bytes as stored, bytes of the new block in the output dtype, numel of
        its largest tensor, numel of its attention)."""
        metas = {rel: source.ckpt.meta(source.arch.layer_prefix(k) + rel) for rel in source.blocks[k]}
        out = sum(
            math.prod(m.shape)
            * (job.dtype.itemsize if job.dtype is not None and m.dtype.is_floating_point else m.dtype.itemsize)
            for m in metas.values()
        )
        attention = sum(math.prod(m.shape) for rel, m in metas.items() if "attn" in rel)
        return sum(m.nbytes for m in metas.values()), out, max(math.prod(m.shape) for m in metas.values()), attention

    stored, new, widest, attention = max(sizes(k) for k in source.blocks)
    n = source.layout.intermediate
    gpu = job.device.type != "cpu"
    # Blocks are read as stored and stay on the CPU; tensors go to the device as float32 when
    # used. The MLP cost is freed before the fusion starts: only the larger of the two counts.
    fusing = ("fusing one tensor (float32 copies)", FUSION_COPIES * 4 * widest)
    if solver == "exact":
        cost_cpu, cost_device = ("MLP cost (float64, for LAPJV)", 8 * n * n), ("MLP cost (float32)", 4 * n * n)
    else:
        cost_cpu = cost_device = ("MLP cost and Sinkhorn buffers (float32)", SINKHORN_BUFFERS * 4 * n * n)
    cpu = {
        "runtime": RUNTIME,
        "two source blocks": 2 * stored,
        "new block": new,
        # measured, the whole CLI against one layer built alone: ~0.2 GB more at 1B and 8B shapes
        "reading, writing and checksums": PIPELINE,
    }
    device: dict[str, int] = {}
    if not gpu:
        cpu.update([max(cost_cpu, fusing, key=lambda part: part[1])])
        return LayerMemory(cpu, device)
    if solver == "exact":
        cpu.update([max(cost_cpu, fusing, key=lambda part: part[1])])
    device["attention of both blocks (float32)"] = 2 * 4 * attention
    device.update([max(cost_device, fusing, key=lambda part: part[1])])
    return LayerMemory(cpu, device)


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def check_memory(job: JobView, solver: str, cpu_budget: int | None, device_budget: int | None) -> LayerMemory:
    """Refuse (UsageError) a job whose new layers would not fit the budgets (bytes; None: no
    limit); the message names what needs the memory and the ways out."""
    need = layer_memory(job, solver)
    n = job.source.layout.intermediate
    for where, total, parts, budget in (
        ("memory", need.cpu_total, need.cpu, cpu_budget),
        (f"{job.device} memory", need.device_total, need.device, device_budget),
    ):
        if budget is None or total <= budget:
            continue
        biggest = ", ".join(f"{name} {_gb(size)}" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:3])
        if solver == "exact":
            ways = (
                f"run on a machine with {_gb(total)} or more of RAM, or use alignment: {{solver: sinkhorn}} with "
                f"--device cuda (float32 on the GPU: about {_gb(SINKHORN_BUFFERS * 4 * n * n)} there)"
            )
        else:
            ways = (
                f"use a device with {_gb(total)} or more, or alignment: {{solver: exact}} on a CPU with "
                f"{_gb(layer_memory(job, 'exact').cpu_total)} of RAM"
            )
        raise UsageError(
            f"opt-deus with solver {solver} needs about {_gb(total)} of {where} per new layer at these shapes "
            f"(MLP width {n}: {biggest}), more than the budget of {_gb(budget)}; {ways}"
        )
    return need


def free_memory() -> int | None:
    """Bytes of RAM available to a new process now (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_device_memory(device) -> int | None:
    """Free bytes on a CUDA device; None for the CPU."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.mem_get_info(device)[0]


def guard(job: JobView, solver: str) -> bool:
    """check_memory against --memory-budget, or else against what is free now; then whether the
    budget also allows the faster overlapped layer (True): the exact assignment solved in a
    forked child beside attention. Its peak is bounded by twice the in-order one: the child
    shares every page the CLI holds at the fork, and each that either side writes afterwards
    (attention's buffers reuse freed memory) exists twice. Measured at 8B shapes: 6.3 GB for the
    CLI and its child together, against 3.4 GB in order (BENCHMARKS.md)."""
    budget = job.memory_budget if job.memory_budget is not None else free_memory()
    need = check_memory(job, solver, budget, free_device_memory(job.device))
    return budget is None or 2 * need.cpu_total <= budget
