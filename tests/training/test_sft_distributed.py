"""Supervised fine-tuning unchanged under `torchrun` and `accelerate launch` with 2 CPU processes
(gloo): both train, rank 0 alone writes, and the output keeps the single-process invariants (base
tensors bit-identical, the record), read back by this test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    ROOT,
    checkpoint_tensors,
)
from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

SHIPPED = ROOT / "examples" / "tiny-llama"
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
    "accelerate": [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
    ],  # + a free port
}


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sft_under_a_two_process_launch(tmp_path, launcher):
    if shutil.which(LAUNCHERS[launcher][0]) is None or shutil.which("opt-deus", path=str(BIN)) is None:
        pytest.skip(f"{launcher} and opt-deus are installed beside the interpreter by `make install`")
    deeper = tmp_path / "deeper"
    upscale(SHIPPED, parse_recipe({"method": "copy", "positions": "bottom", "count": 2}), deeper, Options(device="cpu"))
    new = read_manifest(deeper).trainable_layers
    out = tmp_path / "trained"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    launch = LAUNCHERS[launcher] + ([free_port()] if launcher == "accelerate" else [])
    command = [
        *launch,
        str(BIN / "opt-deus"),
        "train",
        str(deeper),
        "--data",
        str(ROOT / "examples/sft/alpaca.jsonl"),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--device",
        "cpu",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)  # one JSON document: only rank 0 prints
    assert record["world_size"] == 2 and record["steps"] == 2 and record["format"] == "alpaca"
    assert read_manifest(out).training == record
    # 2 steps x 2 processes x 2 examples, each with a completion of a few tokens, every one counted once
    assert 8 * 3 <= record["loss_tokens"] < record["tokens"]
    before, after = checkpoint_tensors(deeper), checkpoint_tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer not in new:
            assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
