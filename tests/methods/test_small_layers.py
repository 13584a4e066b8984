"""No fixed cost per layer: a small OpT-DeUS layer solves its MLP assignment in process (no
forked child) on one thread; a large one overlaps it with attention. Either way the output is
the same bytes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from conftest import EXACT, SINKHORN, ctx, planted_permutation, random_block
from conftest import SHIPPED_MODEL as SHIPPED
from opt_deus_cli import solvers
from opt_deus_cli.block import Decisions
from opt_deus_cli.methods.opt_deus import OptDeusMethod, attention, corrected
from opt_deus_cli.recipe import load_recipe
from opt_deus_cli.upscale import Options, upscale


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_shipped_model_layers_are_solved_in_process_with_the_same_bytes(tmp_path, monkeypatch):
    forks = []
    real = solvers.exact_assignments_in_background
    monkeypatch.setattr(
        "opt_deus_cli.methods.opt_deus.plans.exact_assignments_in_background",
        lambda *a, **k: forks.append(1) or real(*a, **k),
    )
    small = upscale(SHIPPED, load_recipe("top-half"), tmp_path / "small", Options(device="cpu"))
    assert forks == []  # 512 neurons: below the threshold, no child process
    assert all(layer.report["mlp"]["overlapped"] is False for layer in small.layers if layer.origin == "new")
    monkeypatch.setattr(corrected, "OVERLAP_MIN_NEURONS", 0)
    overlapped = upscale(SHIPPED, load_recipe("top-half"), tmp_path / "overlapped", Options(device="cpu"))
    assert len(forks) == len(overlapped.new_layers) == 4
    assert all(layer.report["mlp"]["overlapped"] is True for layer in overlapped.layers if layer.origin == "new")
    assert shard_digests(tmp_path / "small") == shard_digests(tmp_path / "overlapped")


def test_a_small_layer_is_built_on_one_thread_and_the_threads_come_back(monkeypatch):
    seen = []
    real = attention.align_attention
    monkeypatch.setattr(
        corrected, "align_attention", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
    )
    lower = random_block("llama", seed=1)
    upper = planted_permutation(lower, "llama", seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small, _ = OptDeusMethod(EXACT).build(lower, upper, ctx("llama"))
        assert seen == [1] and torch.get_num_threads() == 2
        OptDeusMethod(SINKHORN).build(lower, upper, ctx("llama"))  # n x n iterations: every thread
        assert seen == [1, 2]
        monkeypatch.setattr(corrected, "OVERLAP_MIN_NEURONS", 0)  # the same layer counted as large, in order
        in_order = dataclasses.replace(ctx("llama"), decisions=Decisions(overlap=False))
        large, _ = OptDeusMethod(EXACT).build(lower, upper, in_order)
        assert seen == [1, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(small[name], large[name]) for name in small)
