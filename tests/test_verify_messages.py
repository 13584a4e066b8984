"""`opt-deus verify` says what it is doing while it works (issue 23, item 6), explains the logit
difference of a trained model as training, and says why base files differ once, in a short line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()
TEXT = (Path(__file__).resolve().parent.parent / "examples" / "tiny-llama" / "heldout.txt").read_text()


def invoke(*args):
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code in (0, 1), result.output
    return result


def test_verify_shows_each_phase(tmp_path):
    """stderr is not a terminal here: one plain line per phase, with the steps counted."""
    base = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
    invoke("upscale", base, "--recipe", "llama-pro", "--out", tmp_path / "o", "--device", "cpu")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:6000])
    result = invoke("verify", base, tmp_path / "o", "--text", text, "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    phases = [line.split("] ", 1)[1] for line in lines]
    assert phases == [
        "output: checking files (sha256)",
        "base: checking files (sha256)",
        "base: loading",
        "base: logits on fixed token ids",
        "base: perplexity on t.txt",
        "output: loading",
        "output: logits on fixed token ids",
        "output: perplexity on t.txt",
        "done",
    ]
    total = int(lines[-1].split("/")[1].split()[0])
    assert lines[-1].startswith(f"[{total}/{total} ") and total > 10
    # --json keeps stderr quiet for scripts
    result = invoke("verify", base, tmp_path / "o", "--device", "cpu", "--json")
    assert result.exit_code == 0 and result.stderr == "" and json.loads(result.stdout)["ok"]


def test_verify_explains_a_trained_model_by_its_training(tmp_path):
    base = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
    invoke("upscale", base, "--recipe", "llama-pro", "--out", tmp_path / "o", "--device", "cpu")
    data = tmp_path / "train.txt"
    data.write_text(TEXT[:4000])
    result = invoke(
        "train",
        tmp_path / "o",
        "--data",
        data,
        "--out",
        tmp_path / "trained",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    result = invoke("verify", base, tmp_path / "trained", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "training after it (2 steps" in result.stdout and "a trained model promises no more" in result.stdout
    assert "residual stream" not in result.stdout  # the up-scaling's explanation is not the reason here


def test_a_changed_base_is_said_once_in_a_short_line(model_factory, tmp_path):
    base = Path(shutil.copytree(model_factory("llama", layers=6), tmp_path / "base"))
    invoke("upscale", base, "--recipe", "llama-pro", "--out", tmp_path / "o", "--device", "cpu")
    recorded = [f["name"] for f in json.loads((tmp_path / "o" / "opt-deus-manifest.json").read_text())["base"]["files"]]
    assert len(recorded) >= 4
    for name in recorded:  # every file changed: another model of the same shape
        path = base / name
        if name.endswith(".safetensors"):
            save_file({k: v * 2 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
        else:
            path.write_text(path.read_text() + "\n")  # still valid JSON
    result = invoke("verify", base, tmp_path / "o", "--device", "cpu")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].count("another model") == 1 and len(failed[0]) < 300, failed
    assert (
        f"base files {', '.join(recorded[:3])} and {len(recorded) - 3} more differ from what the up-scaling read"
        in failed[0]
    )
