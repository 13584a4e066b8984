"""opt-deus verify: passes on what the manifest promises, fails (exit 1) on a tampered result."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()


def upscale(base, out, recipe="llama-pro"):
    result = runner.invoke(
        app, ["upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--shard-size", "60KB"]
    )
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
    assert "function-preserving: no" in output
    # a big difference is explained as a measurement, and "ok" says what was promised
    assert "a measurement, not a check" in output and "tolerance" not in output
    assert "ok: the result is what the manifest promises (same files, loads and runs" in output


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
    assert code == 2  # it could not check: a usage error, not a failed check
    assert "no usable tokenizer" in output


def test_verify_fails_on_a_changed_base(model_factory, tmp_path):
    """The base's files are checked against the sha256s the up-scaling recorded."""
    import shutil

    base = Path(shutil.copytree(model_factory("llama"), tmp_path / "base"))
    upscale(base, tmp_path / "o")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"  # a layer the output keeps: its logits change too
    shard = base / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    code, output = verify(base, tmp_path / "o")
    assert code == 1
    assert f"base file {shard.name} differs from what the up-scaling read" in output
    (base / "generation_config.json").unlink()
    code, output = verify(base, tmp_path / "o", "--json")
    assert code == 1 and any("generation_config.json is missing" in p for p in json.loads(output)["problems"])


def test_verify_follows_a_hub_cache_snapshot(model_factory, tmp_path):
    from conftest import make_hub_cache

    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny", model_factory("llama"))
    upscale(snapshot, tmp_path / "o")
    code, output = verify(snapshot, tmp_path / "o", "--json")
    assert code == 0, output
    assert json.loads(output)["files_checked"]["base"] >= 3


def test_verify_usage_errors_are_exit_2(model_factory, tmp_path):
    base = model_factory("llama")
    upscale(base, tmp_path / "o")
    for args, message in [
        ((tmp_path / "nope", tmp_path / "o"), "does not exist"),
        ((tmp_path / "o", base), "has no opt-deus manifest"),
        ((base, tmp_path / "o", "--text", tmp_path / "missing.txt"), "is not a file"),
    ]:
        code, output = verify(*args)
        assert code == 2, (args, output)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], output


def test_verify_output_that_does_not_load_is_a_failed_check(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "o"
    upscale(base, out)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the checkpoint holds more layers than the config names
    config["model_type"] = "no-such-family"
    (out / "config.json").write_text(json.dumps(config))
    code, output = verify(base, out)
    assert code == 1
    assert "transformers cannot load" in output and "config.json differs" in output
