"""The command line: the main job, dry runs, recipes, and one-line errors with exit codes."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_upscale_json_summary(model_factory, tmp_path):
    base = model_factory("llama")
    result = runner.invoke(
        app, ["upscale", str(base), "--recipe", "llama-pro", "--out", str(tmp_path / "o"), "--device", "cpu", "--json"]
    )
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
    lines = [l for l in without_progress(output).strip().splitlines() if l.strip()]
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


@pytest.mark.parametrize(
    "args, message",
    [
        (("--device", "tpu"), "--device"),
        (("--dtype", "int4"), "--dtype"),
        (("--shard-size", "lots"), "shard size"),
    ],
)
def test_bad_options(model_factory, tmp_path, args, message):
    code, output = invoke("upscale", model_factory("llama"), "--recipe", "llama-pro", "--out", tmp_path / "o", *args)
    assert code == 2
    assert message in one_line_error(output)


# ---- what a picky first run found (issue 15) ----------------------------------------------------

PROGRESS_LINE = re.compile(r"\[(\d+/\d+ )?\d+s( eta \d+s)?\] ")  # a plain progress line, as in a log


def without_progress(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if not PROGRESS_LINE.match(line))


@pytest.mark.parametrize(
    "args, message",
    [
        (("verify", "a"), "Missing argument 'OUT_DIR'"),
        (("frobnicate",), "No such command 'frobnicate'"),
        (("inspect", "x", "--layer", "four"), "Invalid value for '--layer'"),
        (("upscale", "x", "--recipe", "top-half", "--colour"), "No such option: --colour"),
        (("upscale", "x"), "Missing option '--recipe'"),
    ],
)
def test_click_usage_errors_are_one_line(args, message):
    """click's own usage errors read like ours: one `error:` line, exit 2, no usage block or box."""
    code, output = invoke(*args)
    assert code == 2
    line = one_line_error(output)
    assert message in line and "--help" in line and "╭" not in line


@pytest.mark.parametrize("command", ["upscale", "inspect", "verify", "recipes", None])
def test_help_shows_no_type_for_flags(command):
    code, output = invoke(*([command] if command else []), "--help")
    assert code == 0 and "Usage:" in output
    assert "<bool>" not in output and "╭" not in output
    if command == "upscale":
        assert "--overwrite" in output and "--dry-run" in output


def test_error_messages_keep_their_brackets(model_factory, tmp_path):
    """Messages quote lists like [o_proj, down_proj]; they are not markup to be swallowed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: copy\npositions: top\ncount: 1\nzero_init: o_proj\n")
    code, output = invoke("upscale", model_factory("llama"), "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2 and "[o_proj, down_proj]" in one_line_error(output)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "BF16", "bfloat16"])
@pytest.mark.parametrize("size", ["5G", "500M", "500MB", "2GiB"])
def test_usual_spellings_of_dtype_and_size(model_factory, tmp_path, dtype, size):
    code, output = invoke(
        "upscale",
        model_factory("llama"),
        "--recipe",
        "llama-pro",
        "--out",
        tmp_path / "o",
        "--dtype",
        dtype,
        "--shard-size",
        size,
        "--dry-run",
        "--json",
    )
    assert code == 0, output
    want = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype.lower(), dtype)
    assert json.loads(output)["plan"]["dtype"] == want


def test_progress_is_plain_lines_when_not_a_terminal(model_factory, tmp_path):
    """Under a job scheduler or in a log, stderr is not a terminal: one line per layer."""
    result = runner.invoke(
        app,
        [
            "upscale",
            str(model_factory("llama")),
            "--recipe",
            "llama-pro",
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert [line.split("] ")[1].split(" (")[0] for line in lines[:8]] == [f"layer {i}" for i in range(8)]
    assert lines[0].startswith("[0/8 ") and "(new: copy of [2])" in lines[3]


def test_recipes_say_which_fit_a_model(model_factory):
    code, output = invoke("recipes", model_factory("llama"), "--json")
    assert code == 0, output
    rows = {row["name"]: row for row in json.loads(output)}
    assert not rows["top8"]["fits"] and "too large for a model of 6 layers" in rows["top8"]["why"]
    assert rows["top-half"]["fits"] and rows["top-half"]["output_layers"] == 9
    code, output = invoke("recipes", model_factory("llama"))
    assert code == 0 and "does not fit" in output and "6 -> 9 layers" in output
    code, output = invoke("recipes")
    assert "`opt-deus recipes MODEL`" in output


def test_relative_model_and_output_are_beside_the_recipe(model_factory, tmp_path, monkeypatch):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(model_factory("llama"), project / "models" / "base")
    (project / "recipes").mkdir()
    recipe = project / "recipes" / "r.yaml"
    recipe.write_text("method: copy\npositions: [0]\nmodel: ../models/base\noutput: ../out/deeper\n")
    (project / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths must not be read from here
    code, output = invoke("upscale", "--recipe", recipe)
    assert code == 0, output
    assert (project / "out" / "deeper" / "opt-deus-manifest.json").is_file()


def test_relative_model_that_names_nothing_may_be_a_repo_id(tmp_path):
    from opt_deus_cli.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: copy\npositions: [0]\nmodel: HuggingFaceTB/SmolLM2-135M\noutput: out\n")
    loaded = load_recipe(str(recipe))
    assert loaded.model == "HuggingFaceTB/SmolLM2-135M" and loaded.output == str(tmp_path / "out")


def test_reference_mode_records_only_what_it_uses(model_factory, tmp_path):
    code, output = invoke(
        "upscale",
        model_factory("llama"),
        "--recipe",
        "opt-deus-reference",
        "--out",
        tmp_path / "o",
        "--dry-run",
        "--json",
    )
    assert code == 0, output
    assert json.loads(output)["recipe"]["alignment"] == {"mode": "reference"}


def test_verify_device_cuda_without_a_gpu_is_a_usage_error(model_factory, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    base = model_factory("llama")
    assert invoke("upscale", base, "--recipe", "llama-pro", "--out", tmp_path / "out")[0] == 0
    code, output = invoke("verify", base, tmp_path / "out", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in one_line_error(output)


def test_warnings_repeated_per_layer_are_said_once():
    from opt_deus_cli.manifest import LayerEntry
    from opt_deus_cli.upscale import layer_warnings

    stuck = {"converged": False, "iterations": 1, "marginal_error": 1.0}
    entries = [
        LayerEntry(i, "new", [i - 1, i], "opt-deus", [], {"attention": stuck, "mlp": stuck}) for i in (4, 6, 8, 10)
    ]
    entries += [
        LayerEntry(5, "base", [5], "base", []),
        LayerEntry(12, "new", [11, 12], "opt-deus", [], {"mlp": {**stuck, "iterations": 7}}),
    ]
    said = layer_warnings(entries)
    assert len(said) == 2
    assert said[0].startswith("layers 4, 6, 8, 10: attention plan did not converge") and "; mlp plan" in said[0]
    assert said[1].startswith("layer 12: mlp plan did not converge (iterations 7")
    # the same warning with other figures (real runs: marginal errors differ a little) is still one line
    entries = [
        LayerEntry(i, "new", [i - 1, i], "opt-deus", [], {"mlp": {**stuck, "iterations": 10000, "marginal_error": e}})
        for i, e in ((4, 2.8e-7), (6, 2.6e-7), (8, 2.7e-7))
    ]
    assert layer_warnings(entries) == [
        "layers 4, 6, 8: mlp plan did not converge (iterations 10000, marginal error 2.6e-07..2.8e-07)"
    ]


def test_lesa_predictor_warning_is_said_once(model_factory, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lesa\npositions: [1, 2, 3]\nlesa: {steps: 1}\n")
    code, output = invoke(
        "upscale", model_factory("llama"), "--recipe", recipe, "--out", tmp_path / "o", "--device", "cpu"
    )
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "predictor no better than predicting zero" in warnings[0], output
    manifest = json.loads((tmp_path / "o" / "opt-deus-manifest.json").read_text())
    assert manifest["warnings"] == [warnings[0].removeprefix("warning: ")]


def test_recipes_apply_method_refusals_from_metadata(model_factory):
    """A method's own cheap refusals (LESA: fused projections, fewer than 3 layers) are known
    before any weight is read: `recipes MODEL` and --dry-run say so."""
    code, output = invoke("recipes", str(model_factory("phi3", layers=4)), "--json")
    rows = {r["name"]: r for r in json.loads(output)}
    assert code == 0 and not rows["lesa"]["fits"] and "fused projections" in rows["lesa"]["why"]
    assert rows["top-half"]["fits"]
    code, output = invoke("upscale", str(model_factory("llama", layers=2)), "--recipe", "lesa", "--dry-run")
    assert code == 2 and "at least 3 base layers" in output
