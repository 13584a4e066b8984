"""The training record says which distributed engine accelerate actually ran (issue 23, item 2),
and a requested engine that did not engage is a warning on screen: FSDP asked for on CPU under
torchrun runs as DDP (accelerate switches to FSDP only on GPU backends). FSDP asked for in one
process (no launcher) is a usage error before any work. FSDP2 itself: test_fsdp2.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHIPPED_MODEL, cli, leftovers, refused
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.training import TrainOptions, train
from opt_deus_cli.training.distributed import engine_warning, requested_engine
from opt_deus_cli.upscale import Options, upscale

BIN = Path(sys.executable).parent


def test_a_requested_engine_that_did_not_run_is_a_warning():
    assert requested_engine({"fsdp": "full_shard auto_wrap"}) == "FSDP"
    assert requested_engine({"deepspeed": "ds.json"}) == "DeepSpeed" and requested_engine({"bf16": True}) is None
    said = engine_warning({"engine": "DDP", "distributed_type": "MULTI_CPU", "requested": "FSDP"})
    assert "asks for FSDP, but accelerate ran DDP (distributed type MULTI_CPU" in said
    assert engine_warning({"engine": "FSDP", "distributed_type": "FSDP", "requested": "FSDP"}) is None
    assert engine_warning({"engine": "none", "distributed_type": "NO", "requested": None}) is None


@pytest.fixture(scope="module")
def deeper(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("engine")
    upscale(SHIPPED_MODEL, parse_recipe({"method": "copy", "positions": [6, 7]}), d / "deeper", Options(device="cpu"))
    (d / "train.txt").write_text((SHIPPED_MODEL / "heldout.txt").read_text()[:8000])
    return d / "deeper"


@pytest.mark.slow
def test_one_process_records_no_engine(deeper, tmp_path):
    record = train(
        deeper,
        [deeper.parent / "train.txt"],
        tmp_path / "out",
        TrainOptions(steps=1, batch_size=2, seq_len=32, device="cpu"),
    )
    assert record["distributed"] == {"engine": "none", "distributed_type": "NO", "requested": None}


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=str(BIN)) is None or shutil.which("opt-deus", path=str(BIN)) is None,
    reason="torchrun and opt-deus are installed beside the interpreter by `make install`",
)
def test_fsdp_asked_for_on_cpu_is_recorded_as_the_ddp_that_ran(deeper, tmp_path):
    args = tmp_path / "fsdp.yaml"
    args.write_text("fsdp: full_shard auto_wrap\nfsdp_config:\n  transformer_layer_cls_to_wrap: [LlamaDecoderLayer]\n")
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
        str(deeper.parent / "train.txt"),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--args",
        str(args),
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    assert record["world_size"] == 2
    assert record["distributed"] == {"engine": "DDP", "distributed_type": "MULTI_CPU", "requested": "FSDP"}
    assert "warning: the --args file asks for FSDP, but accelerate ran DDP" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_fsdp_in_one_process_is_a_usage_error_before_any_work(deeper, tmp_path):
    args = tmp_path / "fsdp.yaml"
    args.write_text("fsdp: true\nfsdp_config:\n  version: 2\n  transformer_layer_cls_to_wrap: [LlamaDecoderLayer]\n")
    out = tmp_path / "out"
    result = cli(
        "train", deeper, "--data", deeper.parent / "train.txt", "--out", out, "--steps", "1", "--seq-len", "32",
        "--device", "cpu", "--args", args, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    line = refused(result, 2, "sets fsdp", "but this is one process", "torchrun --nproc_per_node N", "remove fsdp")
    assert "Using fsdp only works" not in line  # not transformers' words, after loading everything
    assert "loading model" not in result.stderr and "tokenizing" not in result.stderr  # refused before the work
    assert leftovers(out) == [] and not (tmp_path / "cache").exists()
