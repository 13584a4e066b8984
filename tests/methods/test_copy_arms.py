"""The copy method's `copy:` block: an upper-neighbour copy and a scaled copy, the two arms that
separate "which neighbour" from "alignment" in the quality study (benchmarks/quality)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import checkpoint_tensors, ctx, load_model, logits, random_block
from opt_deus_cli.errors import UsageError
from opt_deus_cli.job import Options
from opt_deus_cli.layers import recipe_layers
from opt_deus_cli.methods.copy import CopyMethod, CopySettings
from opt_deus_cli.methods.opt_deus import OptDeusMethod
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import dry_run, upscale

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(model, out, **recipe):
    return upscale(model, parse_recipe(recipe), out, Options(device="cpu", shard_size="60KB")).to_dict()


def layer(ts: dict, i: int) -> dict:
    prefix = f"model.layers.{i}."
    return {n[len(prefix) :]: t for n, t in ts.items() if n.startswith(prefix)}


def test_settings_parse_and_refuse_clearly():
    recipe = parse_recipe(
        {"method": "copy", "positions": "top", "count": 2, "copy": {"neighbour": "upper", "scale": 0.5}}
    )
    assert recipe.settings["copy"] == CopySettings("upper", 0.5)
    assert recipe.to_dict()["copy"] == {"neighbour": "upper", "scale": 0.5}
    assert parse_recipe({"method": "copy", "positions": "top", "count": 1}).settings["copy"] == CopySettings()
    bad = [
        ({"neighbour": "above"}, "copy.neighbour must be one of lower, upper"),
        ({"scale": -1}, "copy.scale must be a number >= 0"),
        ({"sclae": 1}, "did you mean 'scale'"),
    ]
    for block, message in bad:
        with pytest.raises(UsageError, match=message):
            parse_recipe({"method": "copy", "positions": "top", "count": 1, "copy": block})
    with pytest.raises(UsageError, match="does not apply to method 'stack'"):
        parse_recipe({"method": "stack", "overlap": 2, "copy": {"neighbour": "upper"}})


def test_an_upper_copy_needs_a_layer_above():
    lower = parse_recipe({"method": "copy", "positions": [5]})
    assert [l.sources for l in recipe_layers(lower, 6) if l.is_new] == [(5,)]  # after the top layer: LLaMA-Pro may
    upper = parse_recipe({"method": "copy", "positions": [1, 3], "copy": {"neighbour": "upper"}})
    assert [l.sources for l in recipe_layers(upper, 6) if l.is_new] == [(1, 2), (3, 4)]
    with pytest.raises(UsageError, match=r"position\(s\) \[5\] out of range .* needs layers k and k\+1"):
        recipe_layers(parse_recipe({"method": "copy", "positions": [5], "copy": {"neighbour": "upper"}}), 6)
    assert not CopyMethod().needs_upper and CopyMethod().copies_lower
    assert CopyMethod(CopySettings("upper")).needs_upper and not CopyMethod(CopySettings("upper")).copies_lower
    assert not CopyMethod(CopySettings("lower", 0.5)).copies_lower  # a scaled copy is computed, not byte-copied


@pytest.mark.parametrize("zero_init", [[], ["o_proj", "down_proj"]])
def test_upper_copy_is_layer_k_plus_1(model_factory, tmp_path, zero_init):
    base = model_factory("llama", tied=True)
    manifest = run(
        base, tmp_path / "o", method="copy", positions="top", count=2, zero_init=zero_init, copy={"neighbour": "upper"}
    )
    assert manifest["new_layers"] == [4, 6]
    # the record names what the layer is built from: the upper neighbour alone (issue 25, item 6)
    assert [l["sources"] for l in manifest["layers"] if l["origin"] == "new"] == [[4], [5]]
    got, src = checkpoint_tensors(tmp_path / "o"), checkpoint_tensors(base)
    for new, k in ((4, 3), (6, 4)):
        for rel, t in layer(src, k + 1).items():
            if rel.split(".")[1] in zero_init:
                assert not layer(got, new)[rel].any(), rel
            else:
                assert torch.equal(layer(got, new)[rel], t), rel  # bit for bit, norms included
    assert load_model(tmp_path / "o").config.num_hidden_layers == 8


def test_scaled_upper_copy_scales_projections_only_and_preserves_function(model_factory, tmp_path):
    base = model_factory("qwen2")  # q/k/v biases: scaled with their weights
    manifest = run(base, tmp_path / "o", method="copy", positions=[2], copy={"neighbour": "upper", "scale": 0.5})
    got, src = layer(checkpoint_tensors(tmp_path / "o"), 3), layer(checkpoint_tensors(base), 3)
    scaled = [rel for rel in src if rel.split(".")[1] in PROJECTIONS]
    assert any(rel.endswith("bias") for rel in scaled) and len(scaled) < len(src)
    for rel, t in src.items():
        if rel.split(".")[1] in ("o_proj", "down_proj"):
            assert not got[rel].any(), rel  # default zero-init of copy
        elif rel in scaled:
            assert torch.equal(got[rel], t * 0.5), rel  # exact in bf16: a power of two
        else:
            assert torch.equal(got[rel], t), rel  # norms unchanged
    assert manifest["function_preserving"] is True
    torch.testing.assert_close(logits(load_model(tmp_path / "o")), logits(load_model(base)), rtol=0, atol=0)


def test_scaled_copy_without_zero_init_changes_the_function(model_factory, tmp_path):
    base = model_factory("llama")
    manifest = run(base, tmp_path / "o", method="copy", positions=[2], zero_init=[], copy={"scale": 2.0})
    assert manifest["function_preserving"] is False
    got, src = layer(checkpoint_tensors(tmp_path / "o"), 3), layer(checkpoint_tensors(base), 2)  # lower neighbour
    assert torch.equal(got["self_attn.o_proj.weight"], src["self_attn.o_proj.weight"] * 2)
    assert not torch.equal(logits(load_model(tmp_path / "o")), logits(load_model(base)))


def test_dry_run_names_the_copied_layer(model_factory, tmp_path):
    base = model_factory("llama")
    plan = dry_run(
        base, parse_recipe({"method": "copy", "positions": [0], "copy": {"neighbour": "upper"}}), tmp_path / "o"
    )
    assert [l["sources"] for l in plan["plan"]["layers"] if l["origin"] == "new"] == [[1]]


def test_half_upper_copy_is_what_reference_mode_gives_when_its_plans_underflow():
    """Weights with rows far apart (as SmolLM2's are for the published cost scale): exp(-C / 0.06)
    underflows in float32, the plans have no mass, and the published fusion leaves 0.5 W_B in every
    projection; only the norms differ (the published rule averages them)."""
    A = {n: t * 30 if t.dim() == 2 else t for n, t in random_block("llama", 1).items()}
    B = {n: t * 30 if t.dim() == 2 else t for n, t in random_block("llama", 2).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, report = OptDeusMethod(AlignmentSettings(mode="reference")).build(A, B, ctx("llama"))
    assert report["mlp"]["plans"]["mlp.up_proj.weight"]["mass"] == 0.0
    arm, _ = CopyMethod(CopySettings("upper", 0.5)).build(A, B, ctx("llama"))
    for name in arm:
        if "proj" in name:
            assert torch.equal(reference[name], arm[name]) and torch.equal(arm[name], B[name] * 0.5), name
        else:
            assert torch.equal(arm[name], B[name]) and not torch.equal(reference[name], B[name]), name


def test_the_shipped_upper_copy_recipe_is_the_studys_arm():
    """`--recipe upper-copy` (the README's recommendation for new data) is the quality study's
    upper-copy arm at the top half."""
    from benchmarks.quality.study import ARMS
    from opt_deus_cli.recipe import load_recipe

    shipped = load_recipe("upper-copy").to_dict()
    arm = parse_recipe({**ARMS["upper-copy"], "positions": "top", "count": "50%"}).to_dict()
    assert {k: v for k, v in shipped.items() if k != "description"} == {
        k: v for k, v in arm.items() if k != "description"
    }
