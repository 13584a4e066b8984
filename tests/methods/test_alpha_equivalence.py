"""The whole chain from alignment to training, checked by a symmetry: OpT-DeUS exact with fusion
alpha 1 and o/down zeroed builds a permuted copy of the lower layer (norms included), and AdamW
with global-norm clipping is equivariant to that permutation, so training it through the tool must
give copy's (LLaMA-Pro's) losses at every step, up to float rounding. alpha 0.5 must not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHIPPED_MODEL
from opt_deus_cli.job import Options
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import upscale

TINY = SHIPPED_MODEL
ZERO = ["o_proj", "down_proj"]
RECIPES = {
    "copy": {"method": "copy", "positions": "top", "count": 2, "zero_init": ZERO},
    "alpha1": {"method": "opt-deus", "positions": "top", "count": 2, "zero_init": ZERO, "fusion": {"alpha": 1.0}},
    "alpha0.5": {"method": "opt-deus", "positions": "top", "count": 2, "zero_init": ZERO, "fusion": {"alpha": 0.5}},
}
TOLERANCE = 1e-5  # nats/token: float rounding of permuted sums (measured: <= 5e-7), far below the alpha 0.5 gap


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Held-out stdlib text of the shipped model, as training and evaluation documents."""
    text = (TINY / "heldout.txt").read_text()
    pieces = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    root = tmp_path_factory.mktemp("data")
    for name, docs in (("train.jsonl", pieces[:-4]), ("eval.jsonl", pieces[-4:])):
        (root / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Each recipe up-scaled and trained 4 steps (eval at 0, 2, 4; train loss every step)."""
    from opt_deus_cli.training import TrainOptions, train

    work = tmp_path_factory.mktemp("alpha")
    results = {}
    for name, recipe in RECIPES.items():
        deeper = work / name
        upscale(TINY, parse_recipe(recipe), deeper, Options(device="cpu"))
        options = TrainOptions(
            steps=4,
            lr=3e-3,
            batch_size=4,
            seq_len=64,
            device="cpu",
            seed=0,
            eval_data=(data / "eval.jsonl",),
            eval_every=2,
            trainer_args={"eval_on_start": True, "logging_steps": 1, "warmup_steps": 0},
        )
        record = train(deeper, [data / "train.jsonl"], work / f"{name}-trained", options)
        results[name] = {
            "dir": deeper,
            "eval": [(r["step"], r["eval_loss"]) for r in record["history"] if "eval_loss" in r],
            "train": [(r["step"], r["loss"]) for r in record["history"] if "loss" in r],
        }
    return results


def layer_tensors(model_dir: Path, index: int) -> dict:
    from safetensors import safe_open

    prefix = f"model.layers.{index}."
    out = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return out


def test_alpha_one_is_a_nontrivial_permutation_of_the_copy(trained):
    new_layer = 8  # top, count 2 in 8 layers: new layers 6 and 8; 8 is built from base layers 6 and 7
    permuted, copied = (
        layer_tensors(trained["alpha1"]["dir"], new_layer),
        layer_tensors(trained["copy"]["dir"], new_layer),
    )
    up_a, up_c = permuted["mlp.up_proj.weight"], copied["mlp.up_proj.weight"]
    assert not torch.equal(up_a, up_c)  # the alignment moved neurons: the test is not trivially true

    def rows(w):
        return sorted(map(tuple, w.float().tolist()))

    assert rows(up_a) == rows(up_c)  # the same rows in another order
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        assert torch.equal(permuted[name], copied[name])


def test_alpha_one_trains_exactly_like_copy(trained):
    copy, alpha1 = trained["copy"], trained["alpha1"]
    assert [s for s, _ in copy["eval"]] == [0, 2, 4] and len(copy["train"]) == 4
    for (step, a), (_, b) in zip(alpha1["eval"] + alpha1["train"], copy["eval"] + copy["train"]):
        assert abs(a - b) <= TOLERANCE, (step, a, b)
    assert abs(copy["eval"][-1][1] - copy["eval"][0][1]) > 20 * TOLERANCE  # training moved the loss


def test_alpha_half_does_not(trained):
    """The check has teeth: a layer that is not a permuted copy trains to other losses."""
    gap = abs(trained["alpha0.5"]["eval"][-1][1] - trained["copy"]["eval"][-1][1])
    assert gap > 20 * TOLERANCE, gap
