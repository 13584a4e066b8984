"""verify on families with a sliding window (issue 25, items 5 and 7): the logit check runs on rows
longer than the window, so a layer given the wrong sliding/full type is caught; an older output of
a post-norm family (o/down zeroed in front of Gemma's post-norms) is warned about, with the fix."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()
# a window longer than the old 48-token check, shorter than the positions the model takes
WINDOW = dict(sliding_window=56, max_position_embeddings=160)


def upscale(base, out, recipe="upper-copy"):
    result = runner.invoke(app, ["upscale", str(base), "--recipe", recipe, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def verify(base, out, *args):
    result = runner.invoke(app, ["verify", str(base), str(out), "--device", "cpu", *args])
    return result.exit_code, result.stdout if "--json" in args else result.output


def rewrite_recorded(out, name, edit) -> None:
    """Change one output file and the manifest's record of it (as if opt-deus had written it so)."""
    path = out / name
    edit(path)
    manifest_path = out / "opt-deus-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["output"]["files"]:
        if entry["name"] == name:
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(manifest, indent=2))


def test_logits_are_compared_past_the_window(model_factory, tmp_path):
    base = model_factory("gemma2", layers=4, **WINDOW)
    upscale(base, tmp_path / "o")
    code, output = verify(base, tmp_path / "o", "--json")
    report = json.loads(output)
    assert code == 0 and report["ok"], output
    assert report["sliding_window"] == 56 and report["tokens"] == [2, 56 + 64]
    code, text = verify(base, tmp_path / "o")
    assert "2x120 fixed token ids (longer than the sliding window, 56)" in text


def test_a_wrong_layer_type_is_caught(model_factory, tmp_path):
    """Base layer 0 (sliding) swapped to full attention: identical on 48 tokens (the old check, shorter
    than the window), different past the window."""
    base = model_factory("gemma2", layers=4, **WINDOW)
    out = tmp_path / "o"
    upscale(base, out)

    def swap(path):
        config = json.loads(path.read_text())
        assert config["layer_types"][0] == "sliding_attention"
        config["layer_types"][0] = "full_attention"
        path.write_text(json.dumps(config, indent=2))

    rewrite_recorded(out, "config.json", swap)
    code, output = verify(base, out, "--json")
    report = json.loads(output)
    assert code == 1 and any("logits differ" in p for p in report["problems"]), output


def test_llama_keeps_the_short_check(model_factory, tmp_path):
    base = model_factory("llama", layers=4)
    upscale(base, tmp_path / "o")
    report = json.loads(verify(base, tmp_path / "o", "--json")[1])
    assert report["tokens"] == [2, 48] and report["sliding_window"] is None and report["warnings"] == []


def test_an_older_gemma_output_is_warned_about(model_factory, tmp_path):
    """An output whose manifest says o/down were zeroed behind the post-norms (what opt-deus wrote
    before the post-norm start) still verifies, with a warning naming the fix; a new one has none."""
    base = model_factory("gemma3_text", layers=4)
    out = tmp_path / "o"
    upscale(base, out)
    code, output = verify(base, out)
    assert code == 0 and "warning" not in output, output
    manifest_path = out / "opt-deus-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for layer in manifest["layers"]:  # as the older opt-deus recorded its start
        if layer["origin"] == "new":
            prefix = f"model.layers.{layer['index']}."
            layer["zeroed"] = [prefix + "self_attn.o_proj.weight", prefix + "mlp.down_proj.weight"]
            layer.pop("start_values")
    manifest_path.write_text(json.dumps(manifest, indent=2))
    code, output = verify(base, out)
    assert code == 0, output
    assert "warning:" in output and "first training step will be unstable" in output
    new = ", ".join(map(str, manifest["new_layers"]))
    assert "opt-deus upscale" in output and f"new layers {new} " in " ".join(output.split())
    manifest["training"] = {"steps": 10}  # trained since: nothing to warn about
    manifest_path.write_text(json.dumps(manifest, indent=2))
    assert "warning" not in verify(base, out)[1]
