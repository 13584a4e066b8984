"""Help and words a first run reads (issue 23, item 11): depths that agree with the model, usage
lines without typer's braces, whole command descriptions, one form of --overwrite, progress that
names a kept layer plainly, and the package licence as an SPDX string."""

from __future__ import annotations

import re
import warnings

from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()
from conftest import ROOT  # noqa: E402

SHIPPED = ROOT / "examples" / "tiny-llama"
COMMANDS = ("upscale", "inspect", "verify", "recipes", "train", "eval", "compare", "handoff")


def test_recipe_depths_are_those_of_the_model_listed_for():
    plain = runner.invoke(app, ["recipes"])
    assert plain.exit_code == 0
    rows = [
        line
        for line in plain.stdout.splitlines()
        if line.split() and line.split()[0] in ("top-half", "llama-pro", "top8")
    ]
    assert [re.search(r"(\d+) -> (\d+) layers", r).groups() for r in rows] == [("32", "40"), ("32", "48"), ("32", "40")]
    assert all(len(re.findall(r"->", r)) == 1 for r in rows)  # the description no longer carries its own depth
    fitted = runner.invoke(app, ["recipes", str(SHIPPED)])
    assert fitted.exit_code == 0 and "32" not in fitted.stdout and "8 -> 12 layers" in fitted.stdout
    assert "for a model of 8 layers" in fitted.stdout and "a 8-layer" not in fitted.stdout


def test_usage_lines_and_the_command_list_read_plainly():
    for command in COMMANDS:
        usage = runner.invoke(app, [command, "--help"]).stdout.splitlines()[0]
        assert "{" not in usage and "[[" not in usage, usage
    assert runner.invoke(app, ["recipes", "--help"]).stdout.startswith(
        "Usage: root recipes [OPTIONS] [MODEL]\n"
    )  # CliRunner names the program root
    assert runner.invoke(app, ["inspect", "--help"]).stdout.startswith("Usage: root inspect [OPTIONS] DIR\n")
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).stdout
    listed = " ".join(top.split("Commands:")[1].split())
    assert "..." not in listed, listed
    for command in COMMANDS:
        assert re.search(rf"\b{command}\b [A-Z]", listed), command


def test_overwrite_is_one_flag_in_both_commands():
    for command in ("upscale", "train"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        assert re.search(r"^\s+--overwrite\s+Replace", text, re.M) and "--no-overwrite" not in text, command


def test_progress_names_a_kept_layer_plainly(tmp_path):
    result = runner.invoke(
        app, ["upscale", str(SHIPPED), "--recipe", "llama-pro", "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "] layer 0 (base layer 0)" in result.stderr and "base of" not in result.stderr
    assert "] layer 4 (new: copy of [3])" in result.stderr


def test_licence_is_an_spdx_string_setuptools_takes_without_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message).lower()]
