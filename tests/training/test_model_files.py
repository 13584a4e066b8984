"""What `upscale` and `train` carry from the input directory (issue 23, item 3): only what belongs
to a model (tokenizer, generation config, chat template, licence and notice files), plus what
--copy-extra names; and a trained output's README.md is a card of its own, not the input's."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SHIPPED_MODEL
from opt_deus_cli.cli import app
from opt_deus_cli.errors import UsageError
from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

RECIPE = {"method": "copy", "positions": [6, 7]}
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The shipped model (its TRAINING.md, training.json and heldout.txt describe it) plus a licence,
    a notice and a chat template."""
    d = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(SHIPPED_MODEL, d)
    (d / "LICENSE").write_text("MIT\n")
    (d / "NOTICE.txt").write_text("notice\n")
    (d / "chat_template.jinja").write_text("{{ messages }}\n")
    (d / "README.md").write_text("# the base's own card\n")
    return d


MODEL_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "LICENSE",
    "NOTICE.txt",
    "chat_template.jinja",
}
BASE_NOTES = {"TRAINING.md", "training.json", "heldout.txt"}


def test_upscale_copies_only_the_model_files_and_what_copy_extra_names(base, tmp_path):
    upscale(base, parse_recipe(RECIPE), tmp_path / "a", Options(device="cpu"))
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert MODEL_FILES <= names and not BASE_NOTES & names
    assert "the base's own card" not in (tmp_path / "a" / "README.md").read_text()
    upscale(base, parse_recipe(RECIPE), tmp_path / "b", Options(device="cpu", copy_extra=("*.txt", "training.json")))
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"heldout.txt", "training.json"} <= names and "TRAINING.md" not in names
    assert (tmp_path / "b" / "heldout.txt").read_bytes() == (base / "heldout.txt").read_bytes()
    with pytest.raises(UsageError, match=r"--copy-extra \*\.csv matches no file of .*TRAINING\.md"):
        upscale(base, parse_recipe(RECIPE), tmp_path / "c", Options(device="cpu", copy_extra=("*.csv",)))
    assert not (tmp_path / "c").exists()


def test_upscale_cli_takes_copy_extra_repeated(base, tmp_path):
    result = runner.invoke(
        app,
        [
            "upscale",
            str(base),
            "--recipe",
            str(_recipe(tmp_path)),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "--copy-extra",
            "TRAINING.md",
            "--copy-extra",
            "heldout.*",
        ],
    )
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"TRAINING.md", "heldout.txt"} <= names and "training.json" not in names


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("method: copy\npositions: [6, 7]\n")
    return path


@pytest.mark.slow
def test_trained_output_has_its_own_card_and_only_model_files(base, tmp_path):
    deeper = tmp_path / "deeper"
    upscale(base, parse_recipe(RECIPE), deeper, Options(device="cpu", copy_extra=("heldout.txt",)))
    data = tmp_path / "train.txt"
    data.write_text((SHIPPED_MODEL / "heldout.txt").read_text()[:6000])
    out = tmp_path / "trained"
    result = runner.invoke(
        app,
        [
            "train",
            str(deeper),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert MODEL_FILES <= names and "heldout.txt" not in names and not BASE_NOTES & names
    record = read_manifest(out).training
    card = (out / "README.md").read_text()
    assert "initialised, not trained" not in card and "Function-preserving" not in card
    assert str(deeper.resolve()) in card and "2 steps" in card and f"{record['tokens']:,} tokens" in card
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card
    losses = [row["loss"] for row in record["history"] if "loss" in row]
    assert f"first {losses[0]:.4f}, final {losses[-1]:.4f}" in card
    assert "only the new layers [7, 9]" in card and f"{record['check']['frozen_identical']} tensors" in card
    result = runner.invoke(
        app,
        [
            "train",
            str(deeper),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "t2"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--copy-extra",
            "heldout.txt",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t2" / "heldout.txt").is_file()
    result = runner.invoke(
        app, ["train", str(deeper), "--data", str(data), "--out", str(tmp_path / "t3"), "--copy-extra", "nothing*"]
    )
    assert result.exit_code == 2 and "--copy-extra nothing* matches no file" in result.output
