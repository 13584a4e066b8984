"""card.py on its own (issue 19): the output's model card is huggingface_hub's format, read back by
huggingface_hub; it carries the base's licence (never the base's card), and its body says what
was done and how to train and check the result."""

from __future__ import annotations

from huggingface_hub import ModelCard

from opt_deus_cli.card import CARD_FILE, base_license, model_card
from opt_deus_cli.manifest import LayerEntry

LAYERS = [
    LayerEntry(0, "base", [0], "base", []),
    LayerEntry(
        1, "new", [0, 1], "opt-deus", ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    ),
    LayerEntry(2, "base", [1], "base", []),
]
RECIPE = {"method": "opt-deus", "positions": [0], "zero_init": ["o_proj", "down_proj"]}


def card(base_dir, preserving=True):
    out = base_dir.parent / "deeper"
    return model_card(
        base_repo_id="org/base",
        base_dir=base_dir,
        model_type="llama",
        recipe=RECIPE,
        layers=LAYERS,
        new_layers=[1],
        function_preserving=preserving,
        out_dir=out,
        tool_version="9.9",
    )


def test_the_card_reads_back_through_huggingface_hub(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / CARD_FILE).write_text("---\nlicense: apache-2.0\ntags: [base-only-tag]\n---\n# The base's own card\n")
    path = tmp_path / CARD_FILE
    card(base).save(path)
    back = ModelCard.load(path)
    assert back.data.base_model == "org/base" and back.data.license == "apache-2.0"
    assert back.data.library_name == "transformers" and back.data.pipeline_tag == "text-generation"
    assert back.data.tags == ["opt-deus", "depth-upscaling"]  # the method tag, opt-deus here, once
    text = back.text
    assert "# deeper" in text and "2 -> 3 decoder layers, method `opt-deus`. New layers: [1]." in text
    # the layer table says what was set at the start, and to what
    assert "| 1 | new | 0, 1 | opt-deus | self_attn.o_proj.weight, mlp.down_proj.weight = 0 |" in text
    assert "computes exactly what org/base computes" in text
    out = tmp_path / "deeper"  # the commands name the output by its absolute path: they run from anywhere
    assert f"opt-deus train {out}" in text and f"opt-deus verify org/base {out}" in text
    assert "The base's own card" not in text and "base-only-tag" not in path.read_text()


def test_no_licence_without_a_readable_base_card(tmp_path):
    assert base_license(tmp_path) is None  # no card
    (tmp_path / CARD_FILE).write_text("---\nlicense: [unclosed\n---\n")
    assert base_license(tmp_path) is None  # broken metadata: no licence line rather than a failure
    text = str(card(tmp_path, preserving=False))
    assert "license:" not in text.split("---")[1]
    assert "no: this recipe changes what the model computes until it is trained" in text
