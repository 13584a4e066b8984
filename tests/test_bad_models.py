"""Bad model directories through the real command line (source.py, checkpoint.py): every one is
refused with one line and the right exit code, leaving nothing at the output location; a
checkpoint is never unpickled; NaN and Inf in the sources are refused unless allowed.

Split from test_reliability.py (issue 19); the command-line helpers are in conftest.py."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (
    INDEX,
    Unpickled,
    edit_header,
    edit_tensors,
    leftovers,
    refused,
    shard_holding,
    upscale,
    write_recipe,
)

# ---- bad model directories -----------------------------------------------------------------


def _no_model_type(m):
    config = json.loads((m / "config.json").read_text())
    del config["model_type"]
    (m / "config.json").write_text(json.dumps(config))


def _quantized(m):
    config = json.loads((m / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (m / "config.json").write_text(json.dumps(config))


def _index_names(m, name):
    index = json.loads((m / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = name
    (m / INDEX).write_text(json.dumps(index))


def _symlink_leaving(m):
    shard = shard_holding(m, "model.norm.weight")
    outside = m.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)


def _side_file_leaving(m):
    secret = m.parent / "secret.txt"
    secret.write_text("not for the output")
    (m / "tokenizer.json").symlink_to(secret)


def _truncated(m):
    shard = shard_holding(m, "model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:-40])


def _header_lies(m):
    def lie(header):
        header["model.layers.1.self_attn.q_proj.weight"]["shape"] = [32, 64]

    edit_header(shard_holding(m, "model.layers.1.self_attn.q_proj.weight"), lie)


def _drop(name):
    return lambda m: edit_tensors(m, lambda n, t: None if n == name else t)


def _reshape(name, shape):
    return lambda m: edit_tensors(m, lambda n, t: torch.zeros(shape, dtype=t.dtype) if n == name else t)


def _config(**changes):
    def apply(m):
        config = json.loads((m / "config.json").read_text())
        config.update(changes)
        (m / "config.json").write_text(json.dumps(config))

    return apply


BAD_MODELS = {
    "missing": (lambda m: m / "nope", "does not exist"),
    "not a directory": (lambda m: m / "config.json", "is not a directory"),
    "no config.json": (lambda m: (m / "config.json").unlink(), "has no config.json"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{'model_type': llama"), "not valid JSON"),
    "config a directory": (lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()), "has no config.json"),
    "no model_type": (_no_model_type, "has no 'model_type'"),
    "model_type not a string": (_config(model_type=["llama"]), "'model_type' must be a string"),
    "no vocab_size": (_config(vocab_size=None), "Field 'vocab_size' expected int"),
    "quantized": (_quantized, "quantized"),
    "index not JSON": (lambda m: (m / INDEX).write_text('{"weight_map": '), "not a valid safetensors index"),
    "index not a map": (
        lambda m: (m / INDEX).write_text('{"weight_map": {"lm_head.weight": 3}}'),
        "not a valid safetensors index",
    ),
    "index names a missing shard": (lambda m: _index_names(m, "model-00009-of-00009.safetensors"), "missing"),
    "index name with ../": (
        lambda m: _index_names(m, "../model/model-00001-of-00002.safetensors"),
        "not a plain file name",
    ),
    "index name absolute": (
        lambda m: _index_names(m, str(m / "model-00001-of-00002.safetensors")),
        "not a plain file name",
    ),
    "symlink leaving": (_symlink_leaving, "symlink leaving"),
    "side file symlink leaving": (_side_file_leaving, "tokenizer.json is a symlink leaving"),
    "truncated shard": (_truncated, "tensor model.norm.weight"),
    "header lies about sizes": (_header_lies, "tensor model.layers.1.self_attn.q_proj.weight"),
    "block tensor missing": (
        _drop("model.layers.3.mlp.up_proj.weight"),
        "tensor model.layers.3.mlp.up_proj.weight is missing",
    ),
    "embedding missing": (_drop("model.embed_tokens.weight"), "tensor model.embed_tokens.weight is missing"),
    "lm_head missing": (_drop("lm_head.weight"), "tensor lm_head.weight is missing"),
    "final norm missing": (_drop("model.norm.weight"), "tensor model.norm.weight is missing"),
    "block tensor wrong shape": (
        _reshape("model.layers.2.self_attn.k_proj.weight", (8, 32)),
        "tensor model.layers.2.self_attn.k_proj.weight has shape [8, 32]",
    ),
    "lm_head wrong shape": (_reshape("lm_head.weight", (96, 32)), "tensor lm_head.weight has shape [96, 32]"),
    "config disagrees with shapes": (_config(intermediate_size=64), "tensor model.layers.0.mlp."),
    "config fewer layers than tensors": (_config(num_hidden_layers=4), "model.layers.4."),
    "config more layers than tensors": (_config(num_hidden_layers=7), "tensor model.layers.6."),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_dir_is_refused(model, tmp_path, case):
    damage, message = BAD_MODELS[case]
    given = damage(model)
    model_dir = given if isinstance(given, Path) else model
    out = tmp_path / "out"
    refused(upscale(model_dir, out), 1, message)
    assert leftovers(out) == []


@pytest.mark.parametrize("suffix", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_weights_are_never_unpickled(model, tmp_path, suffix):
    for p in model.glob("*.safetensors"):
        p.unlink()
    (model / INDEX).unlink()
    sentinel = tmp_path / "code-ran"
    (model / suffix).write_bytes(pickle.dumps(Unpickled(sentinel)))
    out = tmp_path / "out"
    line = refused(upscale(model, out), 1, "never unpickles", "safetensors", suffix)
    assert "save_pretrained(safe_serialization=True)" in line
    assert not sentinel.exists()
    assert leftovers(out) == []


def test_hub_cache_symlinks_are_followed(model, tmp_path):
    """The Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<hash>: not "leaving"."""
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in sorted(model.iterdir()):
        blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / blob.name)
    result = upscale(snap, tmp_path / "out")
    assert result.exit_code == 0, result.output


# ---- NaN and Inf ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("recipe", ["llama-pro", "average"])
def test_nonfinite_source_is_refused_unless_allowed(model, tmp_path, value, recipe):
    bad = "model.layers.5.mlp.up_proj.weight"  # layer 5 is a source for both recipes

    def poison(name, t):
        if name == bad:
            t = t.clone()
            t[0, 0] = value
        return t

    edit_tensors(model, poison)
    recipe = recipe if recipe == "llama-pro" else write_recipe(tmp_path, "method: average\npositions: top\ncount: 1\n")
    out = tmp_path / "out"
    refused(upscale(model, out, recipe=recipe), 1, bad, "NaN or Inf", "--allow-nonfinite")
    assert leftovers(out) == []
    assert upscale(model, out, "--allow-nonfinite", recipe=recipe).exit_code == 0


@pytest.mark.parametrize("recipe", ["top-half", "lesa"])
def test_nonfinite_is_never_suggested_where_it_cannot_help(model, tmp_path, recipe):
    """OpT-DeUS aligns and LESA learns from the source weights: NaN there cannot be passed
    through, so the error does not suggest --allow-nonfinite, and the flag is refused up front."""
    bad = "model.layers.4.mlp.up_proj.weight"  # a source of the top half's first new layer
    edit_tensors(model, lambda n, t: torch.full_like(t, float("nan")) if n == bad else t)
    out = tmp_path / "out"
    line = refused(upscale(model, out, recipe=recipe), 1, bad, "NaN or Inf")
    assert "pass --allow-nonfinite" not in line
    line = refused(upscale(model, out, "--allow-nonfinite", recipe=recipe), 2, "--allow-nonfinite cannot help")
    assert "fix the checkpoint" in line and leftovers(out) == []


def test_nonfinite_outside_the_sources_is_not_a_problem(model, tmp_path):
    edit_tensors(
        model, lambda n, t: torch.full_like(t, float("nan")) if n == "model.layers.0.mlp.up_proj.weight" else t
    )
    result = upscale(
        model, tmp_path / "out", recipe=write_recipe(tmp_path, "method: average\npositions: top\ncount: 1\n")
    )
    assert result.exit_code == 0, result.output
