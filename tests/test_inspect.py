"""opt-deus inspect: the manifest table, one layer's matrices (terminal, PNG, npz), and the
adjacent-pair survey of a base model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import FAMILIES, make_model
from opt_deus_cli.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory):
    """family -> (base, out) up-scaled with the shipped top-half OpT-DeUS recipe."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"inspect-{family}")
            base = make_model(root / "base", family, layers=4)
            invoke("upscale", base, "--recipe", "top-half", "--out", root / "out", "--device", "cpu")
            made[family] = (base, root / "out")
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_output_table_and_layer(upscaled, tmp_path, family):
    base, out = upscaled(family)
    table = invoke("inspect", out)
    assert "4 -> 6 layers" in table and "opt-deus" in table and "→" in table
    rows = json.loads(invoke("inspect", out, "--json"))["layers"]
    new = [r for r in rows if r["origin"] == "new"]
    assert len(new) == 2 and all(r["mlp"]["cost_after"] <= r["mlp"]["cost_before"] + 1e-9 for r in new)

    layer = new[0]["index"]
    png, npz = tmp_path / "a.png", tmp_path / "a.npz"
    text = invoke("inspect", out, "--layer", layer, "--group", "attention", "--png", png, "--save", npz, "--device", "cpu")
    assert "cost before alignment" in text and "transport plan" in text and "legend" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1500, 460)
    saved = np.load(npz)
    assert saved["cost"].shape == (4, 4) and saved["plan"].shape == (4, 4)  # query heads
    assert saved["group_cost"].shape == (2, 2)  # KV groups
    assert saved["v_cost"].shape == (16, 16)  # value dims of both groups
    invoke("inspect", out, "--layer", layer, "--group", "mlp", "--save", npz, "--device", "cpu")
    saved = np.load(npz)
    assert saved["cost"].shape == (48, 48) and np.isclose(saved["plan"].sum(), 1.0)


def test_planted_mlp_permutation_reads_as_diagonal(tmp_path):
    """Layer 1 = layer 0 with its MLP neurons permuted: after alignment the pair's MLP cost is 0
    and the reordered plan is the identity."""
    base = make_model(tmp_path / "base", "llama", layers=3, dtype=torch.float32, shard=None)
    tensors = load_file(base / "model.safetensors")
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    for name in ("gate_proj", "up_proj"):
        tensors[f"model.layers.1.mlp.{name}.weight"] = tensors[f"model.layers.0.mlp.{name}.weight"][perm].clone()
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, perm].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})

    survey = json.loads(invoke("inspect", base, "--json", "--device", "cpu", "--png", tmp_path / "p.png"))
    first = survey["pairs"][0]["mlp"]
    assert first["cost_before"] > 0.01 and first["cost_after"] < 1e-6
    assert survey["pairs"][1]["mlp"]["cost_after"] > 0.01
    assert survey["recipes"]["top-half"] == [0, 1]  # 50% of 3 layers rounds to 2 new layers
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG"

    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: opt-deus\npositions: [0]\n")
    invoke("upscale", base, "--recipe", recipe, "--out", out, "--device", "cpu")
    invoke("inspect", out, "--layer", 1, "--group", "mlp", "--save", tmp_path / "m.npz", "--device", "cpu")
    saved = np.load(tmp_path / "m.npz")
    reordered = saved["plan"][:, saved["order"]]
    np.testing.assert_allclose(reordered, np.eye(48) / 48, atol=1e-12)


def test_inspect_base_text(model_factory):
    text = invoke("inspect", model_factory("mistral"), "--device", "cpu")
    assert "adjacent layers" in text
    assert "recipe top-half" in text and "inserts after base layers [2, 3, 4]" in text
