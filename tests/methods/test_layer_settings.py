"""A new layer runs with the per-layer settings of the layer it is built from (issue 23, docs/method.md
section 6): a copy takes its source's layer type (sliding window or full attention, and with it
Gemma 3's RoPE base), an upper copy the upper layer's; a fusion of a sliding and a full layer the
heavier source's, ties to the upper, recorded in the manifest. The record lists what a layer is
built from (an upper copy: k + 1 alone; issue 25, item 6)."""

from __future__ import annotations

import json

import pytest

from conftest import load_model
from opt_deus_cli.job import Options
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import upscale

# qwen2 slides only when asked: layers >= max_window_layers use the window
SLIDING = {
    "gemma2": {},
    "gemma3_text": {},
    "qwen2": dict(use_sliding_window=True, max_window_layers=2, sliding_window=8),
}
ZERO = ["o_proj", "down_proj"]
# recipe -> (sources the record lists, the source whose settings the new layer takes), for a new layer after k
CASES = {
    "copy": ({"method": "copy"}, lambda k: ([k], k)),
    "upper-copy": ({"method": "copy", "copy": {"neighbour": "upper"}}, lambda k: ([k + 1], k + 1)),
    "opt-deus": ({"method": "opt-deus", "alignment": {"solver": "exact"}}, lambda k: ([k, k + 1], k + 1)),  # tie: upper
    "opt-deus-alpha0.75": (
        {"method": "opt-deus", "alignment": {"solver": "exact"}, "fusion": {"alpha": 0.75}},
        lambda k: ([k, k + 1], k),
    ),
    "average-alpha0.25": (
        {"method": "average", "fusion": {"alpha": 0.25}, "zero_init": ZERO},
        lambda k: ([k, k + 1], k + 1),
    ),
}


def layer_types(model_dir) -> list[str]:
    return json.loads((model_dir / "config.json").read_text())["layer_types"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(SLIDING))
def test_new_layer_takes_its_sources_settings(model_factory, tmp_path, family, case):
    base = model_factory(family, layers=4, **SLIDING[family])
    types = load_model(base).config.layer_types
    k = next(i for i in range(len(types) - 1) if types[i] != types[i + 1])  # a sliding/full boundary
    recipe, expect = CASES[case]
    sources, settings_from = expect(k)
    manifest = upscale(
        base, parse_recipe({**recipe, "positions": [k]}), tmp_path / "o", Options(device="cpu")
    ).to_dict()
    new = manifest["layers"][k + 1]
    assert new["origin"] == "new" and new["sources"] == sources and new["settings_from"] == settings_from
    want = [types[j] for j in range(k + 1)] + [types[settings_from]] + [types[j] for j in range(k + 1, len(types))]
    assert layer_types(tmp_path / "o") == want
    assert load_model(tmp_path / "o").config.layer_types == want  # as transformers runs it
    fusion_notes = [n for n in manifest["config_notes"] if n.startswith(f"layer_types: new layer {k + 1} ")]
    if len(sources) == 2:  # a sliding and a full layer fused: the choice is recorded
        assert len(fusion_notes) == 1 and f"takes base {settings_from}'s" in fusion_notes[0]
    else:
        assert not fusion_notes
    if family == "qwen2":  # transformers < 4.53 reads max_window_layers: the same layers must slide
        written = json.loads((tmp_path / "o" / "config.json").read_text())
        assert [i >= written["max_window_layers"] for i in range(len(want))] == [t == "sliding_attention" for t in want]


def test_stack_repeats_keep_their_own_settings(model_factory, tmp_path):
    base = model_factory("gemma2", layers=4)
    types = load_model(base).config.layer_types
    manifest = upscale(
        base, parse_recipe({"method": "stack", "overlap": 1}), tmp_path / "o", Options(device="cpu")
    ).to_dict()
    assert layer_types(tmp_path / "o") == [types[layer["sources"][0]] for layer in manifest["layers"]]
