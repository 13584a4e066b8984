"""opt-deus verify: passes on what the manifest promises, fails (exit 1) on a tampered result."""

from __future__ import annotations

import json

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()


def upscale(base, out, recipe="llama-pro"):
    result = runner.invoke(app, ["upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--shard-size", "60KB"])
    assert result.exit_code == 0, result.output


def verify(*args):
    result = runner.invoke(app, ["verify", *map(str, args), "--device", "cpu"])
    return result.exit_code, result.stdout if "--json" in args else result.output


def test_verify_passes_on_function_preserving(model_factory, tmp_path):
    base = model_factory("qwen3", tied=True)
    upscale(base, tmp_path / "o")
    code, output = verify(base, tmp_path / "o", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["ok"] and report["function_preserving"]
    assert report["max_abs_logit_diff"] == 0.0


def test_verify_passes_on_non_preserving_that_runs(model_factory, tmp_path):
    base = model_factory("llama")
    upscale(base, tmp_path / "o", recipe="solar")
    code, output = verify(base, tmp_path / "o")
    assert code == 0, output
    assert "function-preserving recipe: no" in output


def tamper(out, layer):
    """Overwrite a new layer's zeroed down_proj with ones, keeping a valid checkpoint."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    shard = out / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})


def test_verify_fails_on_tampered_new_layer(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "o"
    upscale(base, out)
    new = json.loads((out / "opt-deus-manifest.json").read_text())["new_layers"][0]
    tamper(out, new)
    code, output = verify(base, out)
    assert code == 1
    assert "differs from the file the manifest recorded" in output
    assert "logits differ" in output


def test_verify_perplexity_needs_tokenizer(model_factory, tmp_path):
    base = model_factory("llama")
    upscale(base, tmp_path / "o")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n")
    code, output = verify(base, tmp_path / "o", "--text", text)
    assert code == 1
    assert "no usable tokenizer" in output
