"""LESA (methods/lesa.py): the predictor learns, the output loads at the planned depth in every
family, planted structure is recovered as far as the method can, runs are byte-identical, and
the recipe's `lesa:` block is validated."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, checkpoint_tensors, load_model, logits, make_model
from opt_deus_cli.architectures import PROJECTION_ROLES, SUPPORTED
from opt_deus_cli.errors import OptDeusError, UsageError
from opt_deus_cli.job import Options
from opt_deus_cli.methods.lesa.predictor import stack_svd, train_predictor
from opt_deus_cli.methods.lesa.settings import LesaSettings
from opt_deus_cli.recipe import load_recipe, parse_recipe
from opt_deus_cli.upscale import upscale

CPU = torch.device("cpu")


def run(model, out, **recipe):
    recipe = {"method": "lesa", **recipe}
    return upscale(model, parse_recipe(recipe), out, Options(device="cpu", shard_size="60KB")).to_dict()


def planted_stack(shape, layers, slope, seed=0):
    """W_l = A + l * slope * B (float32), A and B random of the given (out, in) shape."""
    g = torch.Generator().manual_seed(seed)
    A, B = 0.05 * torch.randn(shape, generator=g), 0.01 * torch.randn(shape, generator=g)
    return A, B, [A + l * slope * B for l in range(layers)]


def test_svd_blocks_reconstruct_every_layer():
    _, _, W = planted_stack((16, 32), 5, 1.0)
    US, V = stack_svd(W, None, CPU)
    assert US.shape == (16, 16) and V.shape == (16, 5, 32)  # r = min(out, L * in)
    for l, w in enumerate(W):
        torch.testing.assert_close(US @ V[:, l], w, atol=1e-5, rtol=0)
    # the thin SVD of the side-by-side matrix: its singular values, orthonormal rows of V
    torch.testing.assert_close(US.norm(dim=0), torch.linalg.svdvals(torch.cat(W, dim=1)))
    flat = V.reshape(16, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(16), atol=1e-5, rtol=0)
    US, V = stack_svd(W, 4, CPU)
    assert US.shape == (16, 4) and V.shape == (4, 5, 32)


def test_predictor_training_loss_goes_down():
    _, _, W = planted_stack((32, 32), 6, 1.0)
    _, V = stack_svd(W, None, CPU)
    state = torch.get_rng_state()
    _, figures = train_predictor(V, LesaSettings(steps=150))
    assert torch.equal(torch.get_rng_state(), state)  # seeded in a forked RNG
    assert figures["steps"] == 150 and figures["train_rows"] == 32 * 4 and figures["rank"] == 32
    assert figures["train_mse_last"] < 0.05 * figures["train_mse_first"]
    assert figures["train_mse_last"] < 0.05 * figures["train_mse_zero"]
    # the default budget is the authors' 10 epochs of batch 64: ceil(128 / 64) * 10 steps
    _, default = train_predictor(V, LesaSettings())
    assert default["steps"] == 20 and default["train_mse_last"] < default["train_mse_first"]


def test_constant_stack_is_reproduced():
    """All layers equal: the training inputs [V_{l-1}, V_{l+1}] are exactly the inputs at any
    position, so the new layer is the common weight up to the predictor's training error."""
    A, _, W = planted_stack((48, 32), 6, 0.0)
    US, V = stack_svd(W, None, CPU)
    model, _ = train_predictor(V, LesaSettings(steps=200))
    with torch.no_grad():
        new = US @ model(torch.cat([V[:, 2], V[:, 3]], dim=1))
    assert (new - A).norm() < 0.02 * A.norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_with_planned_depth(model_factory, tmp_path, family):
    base = model_factory(family)
    out = tmp_path / "out"
    manifest = run(base, out, positions="top", count=2)
    deeper = load_model(out)
    assert deeper.config.num_hidden_layers == 8 and len(deeper.model.layers) == 8
    assert torch.isfinite(logits(deeper)).all()
    assert manifest["new_layers"] == [4, 6] and manifest["function_preserving"] is False
    assert manifest["recipe"]["lesa"] == dataclasses.asdict(LesaSettings())
    json.dumps(manifest, allow_nan=False)

    arch, src, dst = SUPPORTED[family], checkpoint_tensors(base), checkpoint_tensors(out)
    weights = {arch.weight(role) for role in PROJECTION_ROLES}
    for index, k in ((4, 3), (6, 4)):
        report = manifest["layers"][index]["report"]
        figures = {short: f for short, f in report["lesa"].items() if short != "warnings"}
        assert set(figures) == {arch.projection_short_name(r) for r in PROJECTION_ROLES}
        assert all(f["train_mse_last"] < f["train_mse_first"] for f in figures.values())
        assert "base layer 0" in report["notes"][1]
        for rel in sorted({n.split(".", 3)[3] for n in src if n.startswith("model.layers.0.")}):
            new = dst[f"model.layers.{index}.{rel}"]
            assert new.dtype == src[f"model.layers.{k}.{rel}"].dtype
            if rel in weights:  # predicted: neither neighbour
                assert not torch.equal(new, src[f"model.layers.{k}.{rel}"])
                assert not torch.equal(new, src[f"model.layers.{k + 1}.{rel}"])
            else:  # norms, biases, q/k norms: base layer 0's, as the authors' code does
                assert torch.equal(new, src[f"model.layers.0.{rel}"])


@pytest.mark.parametrize("copy_from, offset", [("lower", 0), ("upper", 1)])
def test_copy_from_neighbour(model_factory, tmp_path, copy_from, offset):
    base = model_factory("qwen3")  # q_norm / k_norm
    manifest = run(base, tmp_path / "out", positions=[1], lesa={"copy_from": copy_from, "steps": 5})
    src, dst = checkpoint_tensors(base), checkpoint_tensors(tmp_path / "out")
    for rel in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight"):
        assert torch.equal(dst[f"model.layers.2.{rel}"], src[f"model.layers.{1 + offset}.{rel}"])
    assert f"base layer {1 + offset}" in manifest["layers"][2]["report"]["notes"][1]


def test_planted_linear_structure(tmp_path):
    """W_l = A + l B for every projection. Between k and k+1 the truth is A + (k + 1/2) B. LESA
    is trained on gap-2 triples (l-1, l+1) -> l and asked about a gap-1 pair, an input it never
    saw; between interior layers it recovers the midpoint only approximately: much closer than
    either neighbour (error about 0.3 of a neighbour's, measured), not exactly as the plain
    average would. (At the ends of the stack it does worse: about 0.8 after 200 steps.)"""
    base = make_model(tmp_path / "base", "llama", dtype=torch.float32, shard=None)
    path = base / "model.safetensors"
    state = load_file(path)
    arch = SUPPORTED["llama"]
    truth = {}
    for i, role in enumerate(PROJECTION_ROLES):
        shape = state[arch.layer_prefix(0) + arch.weight(role)].shape
        A, B, stack = planted_stack(shape, 6, 1.0, seed=i)
        for l, w in enumerate(stack):
            state[arch.layer_prefix(l) + arch.weight(role)] = w.contiguous()
        truth[role] = (A, B)
    save_file(state, path, metadata={"format": "pt"})

    k = 2
    manifest = run(base, tmp_path / "out", positions=[k], lesa={"steps": 200})
    assert manifest["warnings"] == []
    out = checkpoint_tensors(tmp_path / "out")
    for role, (A, B) in truth.items():
        new = out[arch.layer_prefix(k + 1) + arch.weight(role)]
        midpoint = A + (k + 0.5) * B
        neighbour_error = (A + k * B - midpoint).norm()  # = 0.5 |B|, also that of layer k+1
        assert (new - midpoint).norm() < 0.6 * neighbour_error, role


def digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def test_deterministic_bytes(model_factory, tmp_path):
    base = model_factory("qwen2")  # with q/k/v biases
    run(base, tmp_path / "a", positions="middle", count=2, lesa={"steps": 30, "seed": 3})
    run(base, tmp_path / "b", positions="middle", count=2, lesa={"steps": 30, "seed": 3})
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    run(base, tmp_path / "c", positions="middle", count=2, lesa={"steps": 30, "seed": 4})
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_undertrained_predictor_is_flagged(model_factory, tmp_path):
    manifest = run(model_factory("llama"), tmp_path / "out", positions=[2], lesa={"steps": 1})
    assert manifest["warnings"] and "predictor no better than predicting zero" in manifest["warnings"][0]
    assert manifest["warnings"][0].startswith("lesa: ")  # once per run (prepare), not per layer


def test_needs_three_layers(model_factory, tmp_path):
    base = model_factory("llama", layers=2)
    with pytest.raises(UsageError, match="at least 3 base layers"):
        run(base, tmp_path / "out", positions=[0])


def test_recipe_settings():
    recipe = load_recipe("lesa")
    assert recipe.method == "lesa" and recipe.settings["lesa"] == LesaSettings() and recipe.zero_init is None
    assert recipe.to_dict()["lesa"]["copy_from"] == "first"
    recipe = parse_recipe({"method": "lesa", "positions": [1], "lesa": {"lr": 1, "rank": 8, "steps": None}})
    assert recipe.settings["lesa"].lr == 1.0 and recipe.settings["lesa"].rank == 8
    json.dumps(recipe.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    "lesa, message",
    [
        ({"hiden": 64}, "unknown key 'hiden' (did you mean 'hidden'?)"),
        ({"hidden": 0}, "lesa.hidden must be a whole number >= 1"),
        ({"layers": 2.5}, "lesa.layers must be a whole number"),
        ({"steps": True}, "lesa.steps must be a whole number >= 1 or null"),
        ({"rank": 0}, "lesa.rank must be a whole number >= 1 or null"),
        ({"seed": -1}, "lesa.seed must be a whole number >= 0"),
        ({"lr": 0}, "lesa.lr must be a positive number"),
        ({"lr": float("nan")}, "lesa.lr must be a positive number"),
        ({"weight_decay": -0.1}, "lesa.weight_decay must be a number >= 0"),
        ({"norm_loss": 2}, "lesa.norm_loss must be a number in [0, 1]"),
        ({"copy_from": "middle"}, "lesa.copy_from must be one of first, lower, upper"),
        ([1, 2], "lesa must be a mapping"),
    ],
)
def test_recipe_rejects_bad_lesa_block(lesa, message):
    with pytest.raises(UsageError) as e:
        parse_recipe({"method": "lesa", "positions": [1], "lesa": lesa}, source="r.yaml")
    assert message in str(e.value) and str(e.value).startswith("recipe r.yaml")


def test_lesa_block_only_for_lesa():
    with pytest.raises(UsageError, match="key 'lesa' does not apply to method 'average'"):
        parse_recipe({"method": "average", "positions": [1], "lesa": {}})
    with pytest.raises(UsageError, match="key 'fusion' does not apply to method 'lesa'"):
        parse_recipe({"method": "lesa", "positions": [1], "fusion": {"alpha": 0.5}})


lesa_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.lists(st.integers(), max_size=2)
)
lesa_blocks = st.dictionaries(
    st.sampled_from([f.name for f in dataclasses.fields(LesaSettings)] + ["hiden"]), lesa_values, max_size=4
)


@settings(max_examples=200, deadline=None)
@given(lesa_blocks | lesa_values)
def test_any_lesa_block_is_settings_or_a_usage_error(lesa):
    try:
        recipe = parse_recipe({"method": "lesa", "positions": [1], "lesa": lesa}, source="r.yaml")
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith("recipe r.yaml")
        return
    json.dumps(recipe.to_dict(), allow_nan=False)
    assert (
        parse_recipe(recipe.to_dict()).settings["lesa"] == recipe.settings["lesa"]
    )  # the manifest's record reads back


def test_nonfinite_base_weight_is_refused(tmp_path):
    base = make_model(tmp_path / "base", "llama", shard=None)
    state = load_file(base / "model.safetensors")
    state["model.layers.4.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OptDeusError, match=r"model\.layers\.4\.mlp\.up_proj\.weight contains NaN"):
        run(base, tmp_path / "out", positions=[0], lesa={"steps": 1})


def test_zero_weights_stay_zero(tmp_path):
    """A weight type that is zero in every layer (rank 0) gives a zero weight, not a trained guess."""
    base = make_model(tmp_path / "base", "llama", shard=None)
    state = load_file(base / "model.safetensors")
    for l in range(6):
        state[f"model.layers.{l}.self_attn.o_proj.weight"].zero_()
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    manifest = run(base, tmp_path / "out", positions=[2], lesa={"steps": 5})
    assert checkpoint_tensors(tmp_path / "out")["model.layers.3.self_attn.o_proj.weight"].abs().sum() == 0
    assert manifest["layers"][3]["report"]["lesa"]["o_proj"]["rank"] == 0
