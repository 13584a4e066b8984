"""More model families: Gemma 2/3 (four norms, alternating layer types), Phi-3 (fused qkv and
gate_up), and mixtures of experts (Mixtral, Qwen3-MoE), through every method that applies."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MORE_FAMILIES, load_model, logits
from opt_deus_cli.architectures import SUPPORTED, HeadLayout
from opt_deus_cli.errors import OptDeusError
from opt_deus_cli.job import Options
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import upscale


def run(model, out, **recipe):
    return upscale(model, parse_recipe(recipe), out, Options(device="cpu", shard_size="60KB")).to_dict()


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_copy_preserves_function(model_factory, tmp_path, family):
    base = model_factory(family, layers=4)
    manifest = run(base, tmp_path / "o", method="copy", positions="top", count=2)
    assert manifest["function_preserving"]
    new = manifest["new_layers"][0]
    zeroed = manifest["layers"][new]["zeroed"]
    if SUPPORTED[family].post_norms:  # Gemma: the branches start at zero by their post-norm's scale
        assert not any("o_proj" in z for z in zeroed) and len(manifest["layers"][new]["start_values"]) == 2
    else:
        assert any("o_proj" in z for z in zeroed)
    if family in ("mixtral", "qwen3_moe"):  # every expert's down projection
        assert len([z for z in zeroed if "experts" in z]) == 4
    deeper = load_model(tmp_path / "o")
    assert deeper.config.num_hidden_layers == 6
    torch.testing.assert_close(logits(deeper), logits(load_model(base)), rtol=0, atol=0)


@pytest.mark.parametrize("family", MORE_FAMILIES)
@pytest.mark.parametrize("method", ["average", "stack"])
def test_other_methods_load(model_factory, tmp_path, family, method):
    base = model_factory(family, layers=4)
    recipe = {"method": "stack", "overlap": 1} if method == "stack" else {"method": "average", "positions": [1]}
    manifest = run(base, tmp_path / "o", **recipe)
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    if "layer_types" in config:
        assert len(config["layer_types"]) == manifest["output"]["num_layers"]
    deeper = load_model(tmp_path / "o")
    assert torch.isfinite(logits(deeper)).all()


def test_gemma_layer_types_follow_sources(model_factory, tmp_path):
    base = model_factory("gemma2", layers=4)
    before = json.loads((base / "config.json").read_text())["layer_types"]
    manifest = run(base, tmp_path / "o", method="copy", positions=[0, 2])
    after = json.loads((tmp_path / "o" / "config.json").read_text())["layer_types"]
    assert after == [before[layer["sources"][0]] for layer in manifest["layers"]]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_opt_deus_on_more_families(model_factory, tmp_path, family):
    base = model_factory(family, layers=4)
    manifest = run(base, tmp_path / "o", method="opt-deus", positions="top", count=2)
    assert manifest["function_preserving"]
    report = manifest["layers"][manifest["new_layers"][0]]["report"]
    assert report["mlp"]["cost_after"] <= report["mlp"]["cost_before"] + 1e-9
    torch.testing.assert_close(logits(load_model(tmp_path / "o")), logits(load_model(base)), rtol=0, atol=0)


def test_phi3_canonical_round_trip(model_factory):
    """Splitting qkv_proj / gate_up_proj by the head layout and joining them again is exact."""
    from opt_deus_cli.checkpoint import Checkpoint

    ckpt = Checkpoint(model_factory("phi3", layers=4))
    arch = SUPPORTED["phi3"]
    layout = HeadLayout.from_config(ckpt.config, arch)
    block = {n.split("layers.1.", 1)[1]: ckpt.read(n) for n in ckpt.names if ".layers.1." in n}
    canonical = arch.to_canonical(block, layout)
    assert canonical["self_attn.k_proj.weight"].shape == (16, 32)
    assert canonical["mlp.up_proj.weight"].shape == (48, 32)
    back = arch.from_canonical(canonical, layout)
    assert back.keys() == block.keys() and all(torch.equal(back[n], block[n]) for n in block)


def test_fused_projection_cannot_be_zeroed_alone(model_factory, tmp_path):
    with pytest.raises(OptDeusError, match="fused"):
        run(model_factory("phi3", layers=4), tmp_path / "o", method="copy", positions=[0], zero_init=["q_proj"])


def test_mixtral_zero_init_accepts_own_name(model_factory, tmp_path):
    manifest = run(
        model_factory("mixtral", layers=4), tmp_path / "o", method="copy", positions=[0], zero_init=["o_proj", "w2"]
    )
    assert manifest["function_preserving"]


def test_opt_deus_on_experts_is_a_clear_error(model_factory, tmp_path):
    from opt_deus_cli.methods.opt_deus import OptDeusMethod

    if getattr(OptDeusMethod, "supports_experts", False):
        pytest.skip("opt-deus aligns experts")
    with pytest.raises(OptDeusError, match="mixture-of-experts"):
        run(model_factory("mixtral", layers=4), tmp_path / "o", method="opt-deus", positions=[0])
    assert not (tmp_path / "o").exists()


def test_lesa_on_fused_projections_is_a_clear_error(model_factory, tmp_path):
    with pytest.raises(OptDeusError, match="fused"):
        run(model_factory("phi3", layers=4), tmp_path / "o", method="lesa", positions=[1])
    assert not (tmp_path / "o").exists()
