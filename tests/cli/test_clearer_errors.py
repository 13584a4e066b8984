"""Errors a first run met, each one line that names the problem and what to do (issue 23, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SHIPPED_MODEL as SHIPPED
from conftest import messages
from opt_deus_cli.cli import app
from opt_deus_cli.errors import OptDeusError
from opt_deus_cli.training.data import bos_of, build_blocks, check_files, load_tokenizer, pack_stream

runner = CliRunner()

TEXT = (SHIPPED / "heldout.txt").read_text()


def one_error(args: list, code: int) -> str:
    result = runner.invoke(app, [*map(str, args)])
    lines = messages(result.output)  # the error line, besides any progress lines
    assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_a_binary_file_named_txt_is_said_to_be_binary(tmp_path):
    data = tmp_path / "image.txt"
    data.write_bytes(bytes(range(256)) * 64)  # invalid UTF-8 from byte 0x80 on
    line = one_error(["train", SHIPPED, "--data", data, "--out", tmp_path / "o", "--train", "all", "--steps", "1"], 1)
    assert f"{data} is not UTF-8 text" in line and "An error occurred" not in line
    assert not (tmp_path / "o").exists()


def test_a_data_directory_is_answered_with_its_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "x"}\n')
    line = one_error(["train", SHIPPED, "--data", tmp_path / "corpus", "--out", tmp_path / "o", "--train", "all"], 2)
    assert (
        f"--data {tmp_path / 'corpus'} is a directory; give its files, e.g. --data {tmp_path / 'corpus'}/*.jsonl"
        in line
    )
    assert "does not exist" not in line


def test_csv_is_read_by_its_text_column(tmp_path):
    import csv

    docs = [TEXT[:700], TEXT[700:1500]]  # commas, quotes and newlines inside the cells
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body"])
        writer.writerows([[i, d] for i, d in enumerate(docs)])
    tokenizer = load_tokenizer(SHIPPED)
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = build_blocks(
        check_files([tmp_path / "d.csv"], "--data"),
        tokenizer,
        16,
        "body",
        "training data",
        cache_dir=tmp_path / "cache",
    )
    # the documents of the csv, in order, packed as every text file is (BOS at each block's start)
    assert [b["input_ids"].tolist() for b in blocks] == pack_stream(stream, 16, bos_of(tokenizer))
    with pytest.raises(OptDeusError, match=r"no 'text' column .*body.*--text-field"):
        build_blocks([tmp_path / "d.csv"], tokenizer, 16, "text", "training data", cache_dir=tmp_path / "cache")


@pytest.fixture
def truncated(model_factory, tmp_path) -> Path:
    """An up-scaled model whose last shard lost its second half (an interrupted copy)."""
    out = tmp_path / "deeper"
    result = runner.invoke(
        app,
        [
            "upscale",
            str(model_factory("llama", layers=4)),
            "--recipe",
            "llama-pro",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--shard-size",
            "60KB",
        ],
    )
    assert result.exit_code == 0, result.output
    shard = sorted(out.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return out


def test_train_names_a_truncated_checkpoint_as_upscale_does(truncated, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text(TEXT[:3000])
    by_upscale = one_error(
        ["upscale", truncated, "--recipe", "llama-pro", "--out", tmp_path / "u", "--device", "cpu"], 1
    )
    by_train = one_error(["train", truncated, "--data", data, "--out", tmp_path / "t", "--steps", "1"], 1)
    assert "it is truncated" in by_upscale and by_train == by_upscale
    assert not (tmp_path / "t").exists()


def test_inspect_of_a_truncated_output_fails(truncated):
    line = one_error(["inspect", truncated], 1)
    assert "is not the output opt-deus wrote" in line and "the manifest recorded" in line and "opt-deus verify" in line


@pytest.mark.parametrize("offline", [True, False])
def test_a_repo_not_in_the_cache_names_the_reason(tmp_path, offline):
    """HF_HUB_OFFLINE is named only when it is set; else the Hub could not be reached (here an
    endpoint that refuses connections stands for no network)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HOME=str(tmp_path / "home"),
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = "from opt_deus_cli.hub import resolve_model\ntry:\n    resolve_model('acme/nothing-here')\nexcept Exception as e:\n    print(e)\n"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    said = result.stdout.strip()
    assert "acme/nothing-here is not in the local cache" in said, result.stderr
    assert ("HF_HUB_OFFLINE is set" in said) == offline and ("no network" in said) == (not offline)
