"""The output's card (issue 23, item 13): `base_model` only when the base is a Hub repo id (a local
directory's name is no model id), the local path named in the body instead, and the card's own
commands run as written, from any directory."""

from __future__ import annotations

import shlex
from pathlib import Path

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


def card_commands(card_text: str) -> dict[str, list[str]]:
    """`opt-deus X ...` lines of the card's bash blocks, comments cut, as argument lists."""
    found = {}
    for line in card_text.splitlines():
        if line.startswith("opt-deus "):
            args = shlex.split(line, comments=True)[1:]
            found[args[0]] = args
    return found


def test_card_of_a_local_base_and_its_commands_run(tmp_path, monkeypatch):
    out = tmp_path / "made" / "deeper"
    out.parent.mkdir()
    result = runner.invoke(
        app, ["upscale", str(SHIPPED), "--recipe", "llama-pro", "--out", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md")
    assert "base_model" not in card.data.to_dict()  # not `base_model: tiny-llama`, which names no model
    assert f"The local model `{SHIPPED.resolve()}`" in card.text
    commands = card_commands(card.text)
    assert {"verify", "train", "handoff"} <= set(commands)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the commands name absolute paths: they run from any directory
    for name in ("verify", "handoff"):
        ran = runner.invoke(app, commands[name] + (["--device", "cpu"] if name == "verify" else []))
        assert ran.exit_code == 0, (commands[name], ran.output)
    assert commands["train"][1] == str(out.absolute()) and commands["train"][-1] == f"{out.absolute()}-trained"
