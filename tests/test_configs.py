"""configs.py on its own (issue 19): the base config read through transformers' config class, and
the deeper model's config.json: the depth, every per-layer setting following the output layers,
the old window key kept consistent, the dtype, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from opt_deus_cli.architectures import SUPPORTED
from opt_deus_cli.block import OutputLayer
from opt_deus_cli.configs import base_position, load_hf_config, rewrite_config
from opt_deus_cli.errors import OptDeusError

# 4 base layers, a new one after base layer 1 (between 1 and 2), fused with weight 0.75 on the
# lower layer: it behaves like base layer 1, its heavier source (docs/method.md section 6)
LAYERS = [
    OutputLayer(0, "base", (0,), "base"),
    OutputLayer(1, "base", (1,), "base"),
    OutputLayer(2, "new", (1, 2), "opt-deus", ((1, 0.75), (2, 0.25))),
    OutputLayer(3, "base", (2,), "base"),
    OutputLayer(4, "base", (3,), "base"),
]
QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "use_sliding_window": True,
    "sliding_window": 8,
    "max_window_layers": 2,
    "torch_dtype": "float32",
}


def saved(tmp_path, raw: dict):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return load_hf_config(tmp_path)


def test_per_layer_settings_follow_the_output_layers(tmp_path):
    """qwen2: layers from max_window_layers on use the sliding window. The new layer inherits base
    layer 1's full attention; the old key moves so that the same base layers stay on each side."""
    hf = saved(tmp_path, QWEN2)
    assert hf.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert [base_position(layer) for layer in LAYERS] == [0, 1, 1, 2, 3]
    assert base_position(OutputLayer(2, "new", (1, 2), "average")) == 2  # an even fusion: ties go to the upper layer
    out, notes, warnings = rewrite_config(QWEN2, hf, SUPPORTED["qwen2"], LAYERS, None)
    assert out["num_hidden_layers"] == 5 and out["max_window_layers"] == 3
    assert out["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 2
    fusion = (
        "layer_types: new layer 2 is built from base 1 full_attention (weight 0.75), base 2 sliding_attention "
        "(weight 0.25): it takes base 1's, the larger weight (ties to the upper layer)"
    )
    assert notes == [fusion, "max_window_layers: 2 -> 3"] and warnings == []
    assert QWEN2["num_hidden_layers"] == 4 and "layer_types" not in QWEN2  # the input is not modified
    assert out["torch_dtype"] == "float32"
    out, _, _ = rewrite_config(QWEN2, hf, SUPPORTED["qwen2"], LAYERS, torch.bfloat16)  # --dtype bf16
    assert out["torch_dtype"] == "bfloat16"


def test_a_pattern_by_index_differs_and_says_so(tmp_path):
    """gemma2 alternates sliding/full by layer index: the inherited list is not that pattern at the
    new depth, so the output lists it and warns that it needs a transformers that reads it."""
    raw = dict(QWEN2, model_type="gemma2", head_dim=8, sliding_window=8)
    for key in ("use_sliding_window", "max_window_layers"):
        raw.pop(key)
    hf = saved(tmp_path, raw)
    out, notes, warnings = rewrite_config(raw, hf, SUPPORTED["gemma2"], LAYERS, None)
    base = hf.layer_types
    assert out["layer_types"] == [base[0], base[1], base[1], base[2], base[3]]
    assert len(notes) == 1 and "it takes base 1's, the larger weight" in notes[0]  # base 1 and 2 differ
    assert len(warnings) == 1 and "transformers >= 4.53" in warnings[0]


def test_refusals_are_one_line(tmp_path):
    hf = saved(tmp_path, QWEN2)
    with pytest.raises(OptDeusError, match=r"layer_types should list 4 entries"):
        rewrite_config(
            QWEN2,
            type(hf).from_dict(dict(QWEN2, num_hidden_layers=3, max_window_layers=2)),
            SUPPORTED["qwen2"],
            LAYERS,
            None,
        )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OptDeusError) as caught:
        load_hf_config(tmp_path)
    assert str(caught.value).startswith(f"transformers cannot read {tmp_path / 'config.json'}: ")
    assert "\n" not in str(caught.value)
