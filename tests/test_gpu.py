"""--device cuda: the cost matrices and Sinkhorn run on the GPU, the exact solver on the CPU with
the cost moved there once; the result is the CPU's. Runs wherever CUDA exists (skipped here)."""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT, SINKHORN, checkpoint_tensors, ctx, planted_permutation, random_block
from opt_deus_cli import solvers
from opt_deus_cli.methods.opt_deus import OptDeusMethod
from opt_deus_cli.methods.opt_deus.mlp import align_mlp
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def test_exact_costs_are_computed_on_the_gpu_and_moved_once(monkeypatch):
    moved = []
    original = solvers.exact_assignments

    def spy(costs, what="cost matrix"):
        moved.append((costs.device.type, tuple(costs.shape)))
        return original(costs, what)

    monkeypatch.setattr("opt_deus_cli.methods.opt_deus.plans.exact_assignments", spy)
    lower = random_block("llama", seed=1, dtype=torch.bfloat16)
    upper = planted_permutation(lower, "llama", seed=2)
    new, _ = OptDeusMethod(EXACT).build(lower, upper, ctx("llama", "cuda"))
    cpu_new, _ = OptDeusMethod(EXACT).build(lower, upper, ctx("llama"))
    for name in cpu_new:
        assert torch.equal(new[name], cpu_new[name]), name
    # one batch per level of attention (v dims, query heads: on the GPU), the KV groups (tiny, CPU),
    # and the MLP cost, handed over as one CPU float64 array
    assert ("cuda", (4, 8, 8)) in moved and ("cuda", (4, 2, 2)) in moved
    assert moved[-1] == ("cpu", (48, 48))


def test_sinkhorn_runs_on_the_gpu():
    lower = random_block("qwen3", seed=3)
    upper = planted_permutation(lower, "qwen3", seed=4)
    al = align_mlp(lower, upper, ctx("qwen3", "cuda"), SINKHORN)
    assert al.solved.map.P.device.type == "cuda" and al.figures["converged"]
    new, _ = OptDeusMethod(SINKHORN).build(lower, upper, ctx("qwen3", "cuda"))
    cpu_new, _ = OptDeusMethod(SINKHORN).build(lower, upper, ctx("qwen3"))
    for name in cpu_new:
        torch.testing.assert_close(new[name], cpu_new[name], atol=1e-5, rtol=1e-5)


def test_whole_run_on_cuda_writes_what_the_cpu_writes(model_factory, tmp_path):
    base = model_factory("llama", layers=4)
    recipe = parse_recipe({"method": "opt-deus", "positions": "top", "count": 2})
    upscale(base, recipe, tmp_path / "gpu", Options(device="cuda", shard_size="60KB"))
    upscale(base, recipe, tmp_path / "cpu", Options(device="cpu", shard_size="60KB"))

    gpu, cpu = checkpoint_tensors(tmp_path / "gpu"), checkpoint_tensors(tmp_path / "cpu")
    assert gpu.keys() == cpu.keys()
    for name in cpu:
        assert torch.equal(gpu[name], cpu[name]), name
