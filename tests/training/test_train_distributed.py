"""`opt-deus train` unchanged under `torchrun --standalone --nproc_per_node 2` on CPU (gloo): two
processes train, rank 0 alone writes, and the saved output keeps the invariants of a single
process run (base tensors bit-identical, dtypes, the record), read back by this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHIPPED_MODEL, checkpoint_tensors
from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

SHIPPED = SHIPPED_MODEL
BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=str(BIN)) is None or shutil.which("opt-deus", path=str(BIN)) is None,
    reason="torchrun and opt-deus are installed beside the interpreter by `make install`",
)
def test_torchrun_two_cpu_processes(tmp_path):
    deeper = tmp_path / "deeper"
    upscale(SHIPPED, parse_recipe({"method": "copy", "positions": "bottom", "count": 2}), deeper, Options(device="cpu"))
    new = read_manifest(deeper).trainable_layers
    assert new == [1, 3]
    (tmp_path / "train.txt").write_text((SHIPPED / "heldout.txt").read_text()[:12000])
    out = tmp_path / "trained"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(BIN / "opt-deus"),
        "train",
        str(deeper),
        "--data",
        str(tmp_path / "train.txt"),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)  # one JSON document: only rank 0 prints
    assert record["world_size"] == 2 and record["steps"] == 3
    assert record["tokens"] == 3 * 2 * 2 * 32  # steps x processes x batch x seq_len
    assert read_manifest(out).training == record
    before, after = checkpoint_tensors(deeper), checkpoint_tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer not in new:
            assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cache",
        "deeper",
        "train.txt",
        "trained",
    ]  # nothing else written


AGREE = """
import json
import sys
import torch.distributed as dist
from opt_deus_cli.training.distributed import outcome_of_rank_zero
import torch

dist.init_process_group("gloo")
mine = {"error": "rank 0 could not write", "exit_code": 3} if dist.get_rank() == 0 else {"record": {"rank": dist.get_rank()}}
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(outcome_of_rank_zero(mine, torch.device("cpu")), f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is installed beside the interpreter"
)
def test_every_rank_ends_with_rank_zeros_outcome(tmp_path):
    """What makes every process exit with rank 0's error when rank 0 alone fails writing OUT."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "error": "rank 0 could not write",
            "exit_code": 3,
        }
