"""The command line: the main job, dry runs, recipes, and one-line errors with exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_upscale_json_summary(model_factory, tmp_path):
    base = model_factory("llama")
    result = runner.invoke(app, ["upscale", str(base), "--recipe", "llama-pro", "--out", str(tmp_path / "o"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output_layers"] == 8 and summary["function_preserving"] is True
    assert (tmp_path / "o" / "opt-deus-manifest.json").is_file()


def test_recipe_names_model_and_output(model_factory, tmp_path):
    base = model_factory("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: copy\npositions: [0]\nmodel: {base}\noutput: {tmp_path / 'o'}\n")
    code, output = invoke("upscale", "--recipe", recipe)
    assert code == 0, output
    assert "6 -> 7 layers" in output


def test_dry_run_prints_plan(model_factory, tmp_path):
    code, output = invoke("upscale", model_factory("llama"), "--recipe", "solar", "--out", tmp_path / "o", "--dry-run")
    assert code == 0, output
    assert "6 -> 8 layers" in output  # overlap 25% of 6 = 2: [0, 4) + [2, 6)
    assert not (tmp_path / "o").exists()


def test_recipes_lists_shipped():
    code, output = invoke("recipes")
    assert code == 0
    for name in ("top8", "top-half", "llama-pro", "solar", "average", "opt-deus-reference"):
        assert name in output


def one_line_error(output: str) -> str:
    lines = [l for l in output.strip().splitlines() if l.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:")
    return lines[0]


def test_missing_model_dir(tmp_path):
    code, output = invoke("upscale", tmp_path / "nope", "--recipe", "llama-pro", "--out", tmp_path / "o")
    assert code == 1
    assert "does not exist" in one_line_error(output)


def test_bad_recipe_key_suggests(model_factory, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: copy\npositions: top\ncuont: 2\n")
    code, output = invoke("upscale", model_factory("llama"), "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2
    assert "did you mean 'count'" in one_line_error(output)


def test_count_too_large(model_factory, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: average\npositions: top\ncount: 6\n")
    code, output = invoke("upscale", model_factory("llama"), "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2
    assert "too large" in one_line_error(output)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "o"
    assert invoke("upscale", base, "--recipe", "llama-pro", "--out", out)[0] == 0
    code, output = invoke("upscale", base, "--recipe", "llama-pro", "--out", out)
    assert code == 2
    assert "--overwrite" in one_line_error(output)
    assert invoke("upscale", base, "--recipe", "llama-pro", "--out", out, "--overwrite")[0] == 0


def test_unsupported_architecture(tmp_path):
    from conftest import make_model

    base = make_model(tmp_path / "gpt2", "gpt2", layers=2, n_embd=32, n_head=4, n_layer=2)
    code, output = invoke("upscale", base, "--recipe", "llama-pro", "--out", tmp_path / "o")
    assert code == 1
    line = one_line_error(output)
    assert "gpt2" in line and "llama" in line and "qwen3" in line


@pytest.mark.parametrize("args, message", [
    (("--device", "tpu"), "--device"),
    (("--dtype", "int4"), "--dtype"),
    (("--shard-size", "lots"), "shard size"),
])
def test_bad_options(model_factory, tmp_path, args, message):
    code, output = invoke("upscale", model_factory("llama"), "--recipe", "llama-pro", "--out", tmp_path / "o", *args)
    assert code == 2
    assert message in one_line_error(output)
