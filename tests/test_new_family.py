"""A new dense family is one SUPPORTED entry (issue 19). Real transformers families opt-deus does
not list, whose blocks are LLaMA-shaped (granite: LLaMA's tensors with residual, attention and
logit multipliers in its config; helium), are added as data, one Architecture entry each, and run
end to end: up-scaled by OpT-DeUS and by a copy, verified (files, loading in transformers, the
base's logits), handed off; the tests' family lists take such an entry in by themselves."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, MORE_FAMILIES, checkpoint_tensors, llama_shaped, make_model
from opt_deus_cli.architectures import SUPPORTED, Architecture
from opt_deus_cli.errors import OptDeusError
from opt_deus_cli.handoff import handoff, target_from_output
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale
from opt_deus_cli.verify import verify

RECIPES = {
    "top-half": {"method": "opt-deus", "positions": "top", "count": "50%"},  # the paper's setting
    "upper-copy": {
        "method": "copy",
        "copy": {"neighbour": "upper"},
        "positions": "top",
        "count": "50%",
        "zero_init": ["o_proj", "down_proj"],
    },
}


def test_the_family_lists_are_the_registry():
    assert FAMILIES + MORE_FAMILIES == tuple(SUPPORTED)
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(FAMILIES) and "phi3" in MORE_FAMILIES


@pytest.mark.parametrize("model_type", ["granite", "helium"])
def test_a_dense_family_is_one_entry(tmp_path, monkeypatch, model_type):
    assert model_type not in SUPPORTED
    base = (
        make_model(
            tmp_path / "base",
            model_type,
            layers=4,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
            embedding_multiplier=3.0,
        )
        if model_type == "granite"
        else make_model(tmp_path / "base", model_type, layers=4)
    )
    with pytest.raises(OptDeusError, match=f"unsupported model_type '{model_type}'"):
        upscale(base, parse_recipe(RECIPES["top-half"]), tmp_path / "refused", Options(device="cpu"))
    monkeypatch.setitem(SUPPORTED, model_type, Architecture(model_type))  # the one entry
    assert llama_shaped(SUPPORTED[model_type])  # conftest's FAMILIES would list it: every family test runs on it
    for name, data in RECIPES.items():
        out = tmp_path / name
        manifest = upscale(base, parse_recipe(data, source=name), out, Options(device="cpu"))
        assert manifest.base.model_type == model_type and manifest.new_layers == [2, 4]  # after base layers 1, 2
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model_type and config["num_hidden_layers"] == 6
        if model_type == "granite":  # the family's own settings carried over as they were
            assert (config["residual_multiplier"], config["logits_scaling"]) == (0.5, 2.0)
        report = verify(base, out, torch.device("cpu"))
        assert report["ok"], report["problems"]
        assert report["output_layers"] == 6 and report["max_abs_logit_diff"] <= report["tolerance"]
        tensors, base_tensors = checkpoint_tensors(out), checkpoint_tensors(base)
        q = "self_attn.q_proj.weight"
        assert torch.count_nonzero(tensors["model.layers.2.self_attn.o_proj.weight"]) == 0
        copied = [torch.equal(tensors[f"model.layers.2.{q}"], base_tensors[f"model.layers.{k}.{q}"]) for k in (1, 2)]
        assert copied == ([False, True] if name == "upper-copy" else [False, False])  # fused by OpT-DeUS
        target = target_from_output(out)
        assert target.projection_modules == (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        )
        assert "^model.layers.2." in handoff(out, "axolotl") and "^model.layers.4." in handoff(out, "axolotl")
