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
    _, out = upscaled(family)
    table = invoke("inspect", out)
    assert "4 -> 6 layers" in table and "opt-deus" in table and "→" in table
    rows = json.loads(invoke("inspect", out, "--json"))["layers"]
    new = [r for r in rows if r["origin"] == "new"]
    assert len(new) == 2 and all(r["mlp"]["cost_after"] <= r["mlp"]["cost_before"] + 1e-9 for r in new)

    layer = new[0]["index"]
    png, npz = tmp_path / "a.png", tmp_path / "a.npz"
    text = invoke(
        "inspect", out, "--layer", layer, "--group", "attention", "--png", png, "--save", npz, "--device", "cpu"
    )
    assert "cost before alignment" in text and "transport plan" in text and "legend" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (2000, 460)  # three heatmaps and the matched-cost histogram
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


# ---- options that must not silently do nothing; files it writes (issue 15) ----------------------


def refused(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_png_of_an_output_draws_its_new_layers(upscaled, tmp_path):
    _, out = upscaled("llama")
    png = tmp_path / "profile.png"
    text = invoke("inspect", out, "--png", png)
    assert f"wrote {png}" in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 400)
    assert json.loads(invoke("inspect", out, "--json", "--png", png))["png"] == str(png)


def test_png_of_an_output_without_alignment_is_refused(model_factory, tmp_path):
    invoke("upscale", model_factory("llama"), "--recipe", "llama-pro", "--out", tmp_path / "o")
    assert "no alignment figures" in refused("inspect", tmp_path / "o", "--png", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option, value", [("--save", "x.npz"), ("--group", "attention"), ("--base", "b")])
def test_layer_options_without_layer_are_refused(upscaled, model_factory, tmp_path, option, value):
    _, out = upscaled("llama")
    assert f"{option} applies with --layer N (new layers: 2, 4)" in refused("inspect", out, option, tmp_path / value)
    assert f"{option} applies with --layer" in refused("inspect", model_factory("llama"), option, tmp_path / value)
    assert not (tmp_path / value).exists()


def test_recipe_on_an_output_is_refused(upscaled):
    _, out = upscaled("llama")
    assert "--recipe applies to a base model" in refused("inspect", out, "--recipe", "top-half")


@pytest.mark.parametrize("option", ["--png", "--save"])
def test_a_file_in_a_missing_directory_is_one_line(upscaled, tmp_path, option):
    _, out = upscaled("llama")
    line = refused("inspect", out, "--layer", 2, option, tmp_path / "no" / "such" / "x", "--device", "cpu")
    assert f"directory {tmp_path / 'no' / 'such'} does not exist" in line
    line = refused("inspect", out, "--layer", 2, option, tmp_path, "--device", "cpu")
    assert "is a directory" in line


def test_files_are_written_whole_under_the_name_given(upscaled, tmp_path):
    _, out = upscaled("llama")
    invoke("inspect", out, "--layer", 2, "--save", tmp_path / "raw", "--png", tmp_path / "picture", "--device", "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture", "raw"]  # no .npz added, no temporary left
    assert "plan" in np.load(tmp_path / "raw")
    with Image.open(tmp_path / "picture") as image:
        assert image.format == "PNG"


def test_heatmaps_survive_a_pipe(upscaled):
    """Coloured cells are blank without colours; piped, the cells are characters by brightness."""
    from opt_deus_cli.inspect import RAMP

    _, out = upscaled("llama")
    text = invoke("inspect", out, "--layer", 2, "--group", "mlp", "--device", "cpu")
    block = text.split("transport plan")[1].splitlines()[1:33]  # the 32 rows of the plan (48 neurons -> 32 cells)
    assert len(block) == 32 and all(len(row) == 64 and set(row) <= set(RAMP) for row in block)
    assert len({c for row in block for c in row}) >= 2  # not blank: mass on the matching, none elsewhere
