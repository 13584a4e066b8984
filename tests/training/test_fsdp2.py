"""FSDP2 itself, on two CPU processes (issue 23, item 2): the README's wrap (one `fully_shard` unit
per decoder layer, then the root) over opt-deus's freeze_base keeps frozen and trainable parameters
in separate units; opt-deus's gather (accelerate's get_state_dict, FSDP2 branch) hands rank 0 whole
tensors, not shards; opt-deus's save and check write base tensors bit-identical to the input's, and
the trained layers are what both ranks see and what one process without FSDP computes.

accelerate uses FSDP only on GPU backends, so fsdp2_worker.py (beside this file) drives FSDP2 the
way accelerate's TRANSFORMER_BASED_WRAP does; this test launches it and reads what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHIPPED_MODEL, checkpoint_tensors
from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("fsdp2_worker.py")
LR = 1e-3  # fsdp2_worker.LR: AdamW moves each element by about LR per step


def layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=str(BIN)) is None,
    reason="torchrun is installed beside the interpreter by `make install`",
)
def test_fsdp2_two_cpu_processes(tmp_path):
    deeper = tmp_path / "deeper"  # 8 -> 12 layers, copies between the top half's layers
    recipe = parse_recipe({"method": "copy", "positions": "top", "count": "50%"})
    upscale(SHIPPED_MODEL, recipe, deeper, Options(device="cpu"))
    new = read_manifest(deeper).trainable_layers
    assert new == [4, 6, 8, 10]
    out, views = tmp_path / "out", tmp_path / "views"
    views.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(WORKER), str(deeper), str(out)]
    result = subprocess.run([*command, str(views)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((views / "report.json").read_text())
    assert "save_error" not in report, report["save_error"]  # opt-deus's save and check refused the result

    # freeze_base left exactly the new layers trainable, and each unit is all frozen or all trainable
    assert report["world_size"] == 2
    assert {layer_of(name) for name in report["trainable"]} == set(new)
    units = report["units"]
    assert set(units) == {""} | {f"model.layers.{i}" for i in range(12)}  # the root and one unit per layer
    for unit, held in units.items():
        if unit and int(unit.split(".")[2]) in new:
            assert held == {"frozen": 0, "trainable": 9}, unit  # a new layer: its 7 projections and 2 norms
        else:  # a base layer, or the root: the (tied) embeddings and the final norm
            assert held == {"frozen": 2 if unit == "" else 9, "trainable": 0}, unit
    assert report["mixed_units"] == []
    assert report["coarse_mixed_units"] == ["(root)"]  # the check sees a mix where there is one: the root alone
    assert report["engine"] == {
        "engine": "FSDP",
        "distributed_type": "FSDP",
        "requested": "FSDP",
        "fsdp_version": 2,
        "wrapped_units": 13,
        "mixed_units": [],
    }

    # the gather: whole plain tensors on rank 0 (no DTensor, no shard), every name of the model
    before = checkpoint_tensors(deeper)
    gathered = report["gathered"]
    assert set(before) <= set(gathered)
    for name, tensor in before.items():
        assert gathered[name] == {"type": "Tensor", "shape": list(tensor.shape), "device": "cpu"}, name

    # the save: opt-deus's check passed, and the files say the same on their own
    assert report["check"]["frozen_identical"] == sum(layer_of(n) not in new for n in before)
    after = checkpoint_tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        if layer_of(name) not in new:
            assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name

    # the trained layers: moved, the same in both ranks' views and in the save, and what one process computes
    rank0, rank1 = load_file(views / "rank0.safetensors"), load_file(views / "rank1.safetensors")
    reference = load_file(views / "reference.safetensors")
    assert rank0.keys() == rank1.keys() == reference.keys() == set(report["trainable"])
    for name, trained in rank0.items():
        assert torch.equal(trained, rank1[name]), name
        assert torch.equal(after[name], trained.to(before[name].dtype)), name
        assert not torch.equal(trained, before[name].float()), name
        # gradients averaged over the ranks as one process averages over both batches: equal up to
        # float summation order, far below one step's move (a rank training on its own batch alone
        # would differ by about LR)
        assert (trained - reference[name]).abs().max() < LR / 20, name
    moved = [n for n in rank0 if not torch.equal(after[n], before[n])]
    assert {n for n in rank0 if n.endswith("proj.weight")} <= set(moved)
    assert report["losses"] == pytest.approx(report["reference_losses"], abs=1e-4)
