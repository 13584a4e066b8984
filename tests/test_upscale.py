"""End to end: recipe + tiny real checkpoint -> deeper checkpoint that loads and computes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import FAMILIES, checkpoint_tensors, load_model, logits
from opt_deus_cli.job import Options
from opt_deus_cli.manifest import MANIFEST_FILE
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import dry_run, upscale


def run(model, out, **recipe):
    return upscale(model, parse_recipe(recipe), out, Options(device="cpu", shard_size="60KB")).to_dict()


def check_manifest_files(out, manifest):
    written = {p.name for p in out.iterdir()} - {MANIFEST_FILE}
    assert {f["name"] for f in manifest["output"]["files"]} == written
    for entry in manifest["output"]["files"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_copy_is_function_preserving_and_loads(model_factory, tmp_path, family, tied):
    base = model_factory(family, tied=tied)
    out = tmp_path / "out"
    manifest = run(base, out, method="copy", positions="top", count=2)
    deeper = load_model(out)
    assert deeper.config.num_hidden_layers == 8
    assert len(deeper.model.layers) == 8
    if getattr(deeper.config, "layer_types", None) is not None:
        assert len(deeper.config.layer_types) == 8
    assert deeper.config.tie_word_embeddings == tied
    torch.testing.assert_close(logits(deeper), logits(load_model(base)), rtol=0, atol=0)
    assert manifest["function_preserving"] is True
    assert manifest["new_layers"] == [4, 6]  # pairs (3,4) and (4,5) of a 6-layer model
    assert [l["sources"] for l in manifest["layers"] if l["origin"] == "new"] == [[3], [4]]
    check_manifest_files(out, manifest)
    # shards are written in output-layer order
    index = json.loads((out / "model.safetensors.index.json").read_text())
    order = [index["weight_map"][f"model.layers.{i}.mlp.down_proj.weight"] for i in range(8)]
    assert order == sorted(order)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in checkpoint_tensors(out).values()
    )


def test_copy_tensors_and_zeroed(model_factory, tmp_path):
    base = model_factory("qwen2")  # q/k/v biases
    out = tmp_path / "out"
    manifest = run(base, out, method="copy", positions=[1], zero_init=["o_proj", "down_proj", "q_proj"])
    src, dst = checkpoint_tensors(base), checkpoint_tensors(out)
    assert dst["model.layers.2.self_attn.q_proj.bias"].abs().sum() == 0
    assert dst["model.layers.2.mlp.down_proj.weight"].abs().sum() == 0
    torch.testing.assert_close(dst["model.layers.2.self_attn.k_proj.bias"], src["model.layers.1.self_attn.k_proj.bias"])
    torch.testing.assert_close(dst["model.layers.5.mlp.up_proj.weight"], src["model.layers.4.mlp.up_proj.weight"])
    new = manifest["layers"][2]
    assert new["origin"] == "new" and "model.layers.2.self_attn.q_proj.bias" in new["zeroed"]
    assert manifest["trainable_parameter_regex"] == r"^model\.layers\.(?:2)\."


def test_average_is_the_mean_and_not_preserving(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "out"
    manifest = run(base, out, method="average", positions="bottom", count=1)
    src, dst = checkpoint_tensors(base), checkpoint_tensors(out)
    for rel in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        mean = (src[f"model.layers.0.{rel}"].float() + src[f"model.layers.1.{rel}"].float()) / 2
        torch.testing.assert_close(dst[f"model.layers.1.{rel}"].float(), mean.bfloat16().float())
    assert manifest["function_preserving"] is False
    assert load_model(out).config.num_hidden_layers == 7


def test_stack_reproduces_slices(model_factory, tmp_path):
    base = model_factory("mistral")
    out = tmp_path / "out"
    manifest = run(base, out, method="stack", slices=[[0, 4], [2, 6]])
    src, dst = checkpoint_tensors(base), checkpoint_tensors(out)
    sources = [0, 1, 2, 3, 2, 3, 4, 5]
    assert [l["sources"][0] for l in manifest["layers"]] == sources
    for i, j in enumerate(sources):
        for rel in ("self_attn.v_proj.weight", "mlp.gate_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(dst[f"model.layers.{i}.{rel}"], src[f"model.layers.{j}.{rel}"])
    assert manifest["new_layers"] == [4, 5]
    assert manifest["function_preserving"] is False
    assert load_model(out).config.num_hidden_layers == 8


def test_stack_overlap_solar(model_factory, tmp_path):
    base = model_factory("llama", layers=8)
    manifest = run(base, tmp_path / "out", method="stack", overlap="25%")
    assert [l["sources"][0] for l in manifest["layers"]] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]


def test_sliding_window_config_follows_layers(model_factory, tmp_path):
    base = model_factory("qwen2", layers=6, use_sliding_window=True, sliding_window=16, max_window_layers=3)
    before = json.loads((base / "config.json").read_text())
    assert before["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 3
    out = tmp_path / "out"
    run(base, out, method="copy", positions=[1, 4])
    after = json.loads((out / "config.json").read_text())
    assert after["num_hidden_layers"] == 8
    assert after["layer_types"] == ["full_attention"] * 4 + ["sliding_attention"] * 4
    assert after["max_window_layers"] == 4
    torch.testing.assert_close(logits(load_model(out)), logits(load_model(base)), rtol=0, atol=0)


def test_dtype_conversion_and_single_file(model_factory, tmp_path):
    base = model_factory("llama", shard=None)
    out = tmp_path / "out"
    upscale(
        base,
        parse_recipe({"method": "copy", "positions": "top", "count": 1}),
        out,
        Options(device="cpu", dtype="float32"),
    )
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert all(t.dtype == torch.float32 for t in checkpoint_tensors(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_reupscale_keeps_parent_manifest(model_factory, tmp_path):
    base = model_factory("llama")
    first, second = tmp_path / "a", tmp_path / "b"
    run(base, first, method="copy", positions="top", count=1)
    manifest = run(first, second, method="copy", positions="top", count=1)
    assert manifest["base"]["num_layers"] == 7 and manifest["output"]["num_layers"] == 8
    assert manifest["parent"]["base"]["num_layers"] == 6
    assert (second / "generation_config.json").is_file()


def test_dry_run_writes_nothing(model_factory, tmp_path):
    base = model_factory("llama")
    out = tmp_path / "out"
    result = dry_run(base, parse_recipe({"method": "copy", "positions": "uniform", "count": 3}), out)
    assert not out.exists()
    assert [l["sources"] for l in result["plan"]["layers"] if l["origin"] == "new"] == [[1], [3], [5]]


@pytest.mark.parametrize("method", ["average", "opt-deus"])
def test_float32_output_keeps_the_float32_computation(model_factory, tmp_path, method):
    """--dtype float32 on a bf16 base: a new layer is stored as computed in float32, not rounded
    through bf16 first (a share of the lower layer can be below bf16 resolution)."""
    base = model_factory("llama")
    recipe = {"method": method, "positions": [2], "fusion": {"alpha": 0.3}}
    if method == "opt-deus":
        recipe["zero_init"] = []
    upscale(base, parse_recipe(recipe), tmp_path / "o", Options(device="cpu", dtype="float32"))
    got, src = checkpoint_tensors(tmp_path / "o"), checkpoint_tensors(base)
    name = "model.layers.3.input_layernorm.weight"  # norms are alpha-mixed in both methods
    a, b = src["model.layers.2.input_layernorm.weight"].float(), src["model.layers.3.input_layernorm.weight"].float()
    assert got[name].dtype == torch.float32
    torch.testing.assert_close(got[name], 0.3 * a + 0.7 * b, rtol=0, atol=1e-7)
    assert not torch.equal(got[name], got[name].bfloat16().float())  # not a bf16 value widened


def test_source_blocks_are_evicted_before_the_next_is_read(model_factory):
    """Memory: a new layer needs its two neighbours; reading a third must not happen while two are
    still held (the memory guard counts two source blocks)."""
    from opt_deus_cli.source import SourceModel

    source = SourceModel.open(model_factory("llama"))
    held_at_read = []
    read = source.ckpt.read

    def counting(name):
        held_at_read.append(len(source._cache))
        return read(name)

    source.ckpt.read = counting
    for k in (0, 1, 1, 2, 3, 2):
        block = source.block(k)
        assert set(block) == set(source.blocks[k])
    assert max(held_at_read) < source.cache_size and len(source._cache) == source.cache_size
