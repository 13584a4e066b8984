"""Checkpoints as the Hub ships them (issue 10): config.json written by transformers 4.x, with
`torch_dtype`, no `layer_types`, family defaults left out (gemma's `tie_word_embeddings`) and
`rope_scaling`. A deeper model must load in transformers and compute exactly what the base
computed, and every output layer must behave like the base layer it inherits (sliding or full
attention, window, RoPE), on sequences longer than the sliding window.

Fixtures: tests/fixtures/hub_configs/*.json (real key sets, sizes shrunk; see its README).
Before configs were read through transformers, the gemma cases failed ("tensor lm_head.weight is
missing": the raw JSON has no tie_word_embeddings, the family default is true) and then computed
something else (the sliding/full pattern re-derived from the new depth)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import HUB_FIXTURES, hub_config, make_hub_cache
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

SEQ = 32  # > every fixture's sliding_window (8), < its max_position_embeddings
RECIPES = {
    "copy": {"method": "copy"},  # LLaMA-Pro
    "opt-deus": {"method": "opt-deus", "alignment": {"solver": "exact"}},
}
WHERE = ("bottom", "top")  # new layer after base layer 0, or after base layer N-2


def position(fixture: str, where: str) -> int:
    return 0 if where == "bottom" else hub_config(fixture)["num_hidden_layers"] - 2


def cases():
    for fixture in HUB_FIXTURES:
        for recipe in RECIPES:
            for where in WHERE:
                yield pytest.param(fixture, recipe, where, id=f"{fixture}-{recipe}-{where}")


# ---- shared work: each base and each output is built, loaded and run once per session -----------
def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


def run_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(model.config.vocab_size), use_cache=False).logits


@pytest.fixture(scope="module")
def base(hub_model_factory):
    """base(fixture, **config_overrides) -> (model dir, loaded model, logits)."""
    cache: dict = {}

    def get(fixture: str, **overrides):
        key = (fixture, tuple(sorted(overrides.items())))
        if key not in cache:
            path = hub_model_factory(fixture, **overrides)
            model = load(path)
            cache[key] = (path, model, run_logits(model))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def deeper(base, tmp_path_factory):
    """deeper(fixture, recipe, where, **config_overrides) -> (output dir, manifest), built once;
    an upscale failure is raised again in every test that asks for it."""
    cache: dict = {}

    def get(fixture: str, recipe: str, where: str, **overrides):
        key = (fixture, recipe, where, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("deeper") / "out"
            spec = dict(RECIPES[recipe], positions=[position(fixture, where)])
            try:
                manifest = upscale(
                    base(fixture, **overrides)[0], parse_recipe(spec), out, Options(device="cpu", shard_size="60KB")
                )
                cache[key] = (out, manifest.to_dict())
            except Exception as exc:
                cache[key] = exc
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    return get


# ---- what one decoder layer does, as the loaded model sees it --------------------------------------
def layer_behaviour(model, i: int) -> dict:
    """Everything per-layer that decides what layer i computes: its attention type, its window and
    its RoPE (parameters per layer type where the config has them: gemma3's local/global base)."""
    config = model.config
    attn = model.model.layers[i].self_attn
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[i] if layer_types is not None else None
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and layer_type in rope:
        rope = rope[layer_type]
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    return {"layer_type": layer_type, "sliding_window": window, "rope": dict(rope) if isinstance(rope, dict) else rope}


def check_function_preserved(base_entry, out, manifest) -> None:
    """Loads with AutoModelForCausalLM, one layer deeper, and the same logits as the base (float32,
    no cache, 2 x 32 tokens: past every sliding window)."""
    _, base_model, base_logits = base_entry
    model = load(out)
    assert model.config.num_hidden_layers == base_model.config.num_hidden_layers + 1 == len(model.model.layers)
    assert manifest["function_preserving"]
    diff = (run_logits(model) - base_logits).abs().max().item()
    assert diff <= 1e-6, f"logits differ from the base: max abs diff {diff:.3g}"


def check_layers_inherited(base_entry, out, manifest) -> None:
    """Output layer i behaves like the base layer it takes its settings from (a base layer: itself; a
    new one: the manifest's settings_from, its heaviest source, ties to the upper)."""
    base_model = base_entry[1]
    model = load(out)
    inherits = [layer.get("settings_from", layer["sources"][0]) for layer in manifest["layers"]]
    assert len(inherits) == model.config.num_hidden_layers
    wrong = [
        f"layer {i} (base {j}): {layer_behaviour(model, i)} != {layer_behaviour(base_model, j)}"
        for i, j in enumerate(inherits)
        if layer_behaviour(model, i) != layer_behaviour(base_model, j)
    ]
    assert not wrong, "; ".join(wrong)


# ---- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture, recipe, where", list(cases()))
def test_deeper_model_loads_and_preserves_function(base, deeper, fixture, recipe, where):
    check_function_preserved(base(fixture), *deeper(fixture, recipe, where))


@pytest.mark.parametrize("fixture, recipe, where", list(cases()))
def test_every_layer_behaves_like_the_base_layer_it_inherits(base, deeper, fixture, recipe, where):
    check_layers_inherited(base(fixture), *deeper(fixture, recipe, where))


@pytest.mark.parametrize("fixture, where", [(f, w) for f in ("gemma-2-9b", "gemma-3-1b") for w in WHERE])
def test_layer_types_survive_insertion(base, deeper, fixture, where):
    """Before the fix: with no layer_types written, transformers re-derived the pattern from the NEW
    depth (gemma2 bottom: base layers 1-5 each swapped sliding/full, logits off by 0.63; gemma3
    also swapped RoPE bases 1e4/1e6). The pattern must follow the layers, the output must say which
    transformers it needs (older ones choose the pattern by layer index), and it must be explicit."""
    out, manifest = deeper(fixture, "copy", where)
    entry = base(fixture)
    check_layers_inherited(entry, out, manifest)
    check_function_preserved(entry, out, manifest)
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == [
        entry[1].config.layer_types[layer.get("settings_from", layer["sources"][0])] for layer in manifest["layers"]
    ]
    assert any(">= 4.53.0" in w for w in manifest["warnings"])


@pytest.mark.parametrize("fixture", ["qwen2-sliding", "qwen2.5-7b", "llama-3.1-8b"])
def test_no_version_warning_where_old_transformers_agree(deeper, fixture):
    """Insertion at the top keeps qwen2's window boundary expressible by max_window_layers (what
    transformers < 4.53 reads), and families without layer_types need nothing."""
    _, manifest = deeper(fixture, "copy", "top")
    assert not any("4.53" in w for w in manifest["warnings"])


def test_qwen2_sliding_fixture_exercises_the_window_boundary(base):
    """The fixture itself: full attention below max_window_layers, a window of 8 from there on."""
    _, model, _ = base("qwen2-sliding")
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert [layer_behaviour(model, i)["sliding_window"] for i in range(6)] == [None] * 3 + [8] * 3


def test_gemma3_fixture_has_local_and_global_rope(base):
    _, model, _ = base("gemma-3-1b")
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    thetas = [layer_behaviour(model, i)["rope"]["rope_theta"] for i in range(6)]
    assert thetas == [10000, 10000, 1000000] * 2


@pytest.mark.parametrize("fixture", HUB_FIXTURES)
def test_fixture_checkpoint_is_hub_shaped(hub_model_factory, fixture):
    """config.json byte for byte as in the fixture (no layer_types, torch_dtype kept), HF-named
    shards with an index, lm_head.weight present exactly when the embeddings are not tied."""
    import json

    from conftest import HUB_CONFIGS

    path = hub_model_factory(fixture)
    assert (path / "config.json").read_bytes() == (HUB_CONFIGS / f"{fixture}.json").read_bytes()
    raw = json.loads((path / "config.json").read_text())
    assert "layer_types" not in raw and "dtype" not in raw and "torch_dtype" in raw
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {p.name for p in path.glob("*.safetensors")} and len(set(index.values())) > 1
    tied = load(path).config.tie_word_embeddings  # the family default when the file omits it
    assert ("lm_head.weight" in index) == (not tied)


def test_hub_cache_layout_resolves_offline(tmp_path, hub_model_factory, base, monkeypatch):
    """make_hub_cache lays a fixture out as huggingface_hub's cache; offline, huggingface_hub and
    transformers resolve the repo id to that snapshot. (The fixture's own check: the CLI does not
    take repo ids yet.)"""
    import os

    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    model_dir = hub_model_factory("gemma-3-1b")
    revision = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    snapshot = make_hub_cache(tmp_path / "hub", "google/gemma-3-1b-it", model_dir, revision=revision)
    repo = tmp_path / "hub" / "models--google--gemma-3-1b-it"
    assert snapshot == repo / "snapshots" / revision
    assert (repo / "refs" / "main").read_text() == revision
    for link in snapshot.iterdir():
        target = os.readlink(link)
        assert link.is_symlink() and target.startswith("../../blobs/")
        assert link.read_bytes() == (model_dir / link.name).read_bytes()
        lfs = link.name.endswith(".safetensors")
        assert len(target.rsplit("/", 1)[1]) == (64 if lfs else 40)  # sha256 for LFS, git sha1 otherwise

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = snapshot_download("google/gemma-3-1b-it", cache_dir=tmp_path / "hub")
    assert os.path.samefile(resolved, snapshot)
    assert os.path.samefile(
        snapshot_download("google/gemma-3-1b-it", cache_dir=tmp_path / "hub", local_files_only=True), snapshot
    )
    config_file = hf_hub_download("google/gemma-3-1b-it", "config.json", cache_dir=tmp_path / "hub")
    assert os.path.samefile(os.path.dirname(config_file), snapshot)
    assert (
        huggingface_hub.try_to_load_from_cache("google/gemma-3-1b-it", "config.json", cache_dir=tmp_path / "hub")
        == config_file
    )

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        "google/gemma-3-1b-it", cache_dir=tmp_path / "hub", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    torch.testing.assert_close(run_logits(model), base("gemma-3-1b")[2], rtol=0, atol=0)
