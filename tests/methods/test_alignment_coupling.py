"""A safety net for OpT-DeUS's alignment (docs/method.md section 2), checked end to end through
upscale() and the output checkpoint only, so that it survives any rewrite of the method's code.

With fusion alpha = 1 and zero_init empty the new layer is the lower neighbour k re-ordered by the
alignment, with its own o/down, so it must compute exactly what layer k computes: removing the
original layer k from the deeper model (the new one takes its place) must give the base model's
logits. Any illegal move breaks that: q and k permuted differently, query heads moved without
their o_proj columns, value dims moved without theirs, gate and up moved apart. The function
preservation tests elsewhere cannot see these (o/down are zeroed there), nor can self-fusion tests
(any averaging passes them).

The other rule the logits see only through RoPE is checked on the weights: dims inside a q/k head
are never permuted, and query heads stay in the KV group of their k head. The base models are
built so that undoing a forbidden move would make the alignment cost zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, MORE_FAMILIES, load_model
from opt_deus_cli.architectures import HeadLayout
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

LAYERS = 4
# A permuted layer computes the same sums in another order: float32 noise is ~1e-7 on these
# logits, while the mildest illegal move (q/k mix-ups, where random weights give nearly
# uniform attention) moves them by ~2e-3.
ATOL = 1e-5


def insert_one(base: Path, out: Path, k: int, solver: str = "exact") -> None:
    """One OpT-DeUS layer between base layers k and k+1, so output layer k+1: aligned lower layer,
    nothing of the upper one (alpha 1), o/down kept. (upscale's return value is not used: only the
    checkpoint it writes is a stable interface.)"""
    recipe = {
        "method": "opt-deus",
        "positions": [k],
        "alignment": {"solver": solver},
        "fusion": {"alpha": 1.0},
        "zero_init": [],
    }
    upscale(base, parse_recipe(recipe), out, Options(device="cpu", shard_size="60KB"))
    depth = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth + 1


def layer_tensors(model_dir: Path, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer `index` of a checkpoint, read from its safetensors files: relative name -> tensor."""
    prefix = f"model.layers.{index}."
    found = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            found.update({n[len(prefix) :]: f.get_tensor(n) for n in f.keys() if n.startswith(prefix)})
    assert found, f"no layer {index} in {model_dir}"
    return found


def sizes(model_dir: Path) -> tuple[int, int, int]:
    """(H query heads, G KV heads, head_dim d) from config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    H = config["num_attention_heads"]
    return H, config.get("num_key_value_heads") or H, config.get("head_dim") or config["hidden_size"] // H


def q_k(block: dict[str, torch.Tensor], model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """q (H, d, hidden) and k (G, d, hidden) of a block, float64; Phi-3's fused qkv_proj split by
    rows [q (H*d); k (G*d); v (G*d)]."""
    H, G, d = sizes(model_dir)
    if "self_attn.qkv_proj.weight" in block:
        q, k, _ = block["self_attn.qkv_proj.weight"].split([H * d, G * d, G * d])
    else:
        q, k = block["self_attn.q_proj.weight"], block["self_attn.k_proj.weight"]
    return q.double().reshape(H, d, -1), k.double().reshape(G, d, -1)


def without_layer(model, k: int):
    """The model with decoder layer k removed, and what transformers reads per layer index
    (the depth and layer_types: Gemma's sliding/full masks and rotary tables) following."""
    del model.model.layers[k]
    model.config.num_hidden_layers -= 1
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        model.config.layer_types = types[:k] + types[k + 1 :]
    return model


def forward(model) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # no cache: only the cache reads a layer's own (now stale) layer_idx
        return model(input_ids=ids, use_cache=False).logits


def assert_computes_like_base(out: Path, base: Path, k: int, edit=None) -> None:
    """The deeper model without its original layer k (the new layer in its place) gives the base
    model's logits. edit(new_layer) may change the new layer first."""
    deeper = without_layer(load_model(out), k)
    if edit is not None:
        with torch.no_grad():
            edit(deeper.model.layers[k])
    torch.testing.assert_close(forward(deeper), forward(load_model(base)), atol=ATOL, rtol=0)


def moved(out: Path, base: Path, k: int) -> set[str]:
    """Tensors of the new layer that differ from the lower layer's."""
    new, lower = layer_tensors(out, k + 1), layer_tensors(base, k)
    assert new.keys() == lower.keys()
    return {n for n in new if not torch.equal(new[n], lower[n])}


# ---------------------------------------------------------------------------------------------
# building base models whose layer k+1 is related to layer k


def attention_views(layer, H: int, G: int, d: int) -> dict[str, torch.Tensor]:
    """Views of a loaded decoder layer's attention weights by role (biases as q_bias...);
    Phi-3's fused qkv_proj split by rows."""
    att = layer.self_attn
    if hasattr(att, "qkv_proj"):
        q, k, v = att.qkv_proj.weight.split([H * d, G * d, G * d])
        views = {"q": q, "k": k, "v": v}
    else:
        views = {r: getattr(att, f"{r}_proj").weight for r in "qkv"}
        views.update(
            {f"{r}_bias": getattr(att, f"{r}_proj").bias for r in "qkv" if getattr(att, f"{r}_proj").bias is not None}
        )
    views["o"] = att.o_proj.weight
    return views


def moving_permutation(H: int, G: int, d: int, seed: int = 0) -> dict[str, tuple]:
    """An allowed re-ordering of attention (HeadLayout.random_allowed_permutation) that moves KV
    groups (when G > 1) and query heads within a group (when H > G): role -> (dim, index)."""
    layout = HeadLayout(hidden=1, num_heads=H, num_kv_heads=G, head_dim=d, intermediate=2)
    r = H // G
    for s in range(seed, seed + 1000):
        moves = layout.random_allowed_permutation(torch.Generator().manual_seed(s))
        heads = moves["q"][1].reshape(H, d)[:, 0] // d  # new query head j is old head heads[j]
        slots = torch.arange(H)
        if (G == 1 or (heads // r != slots // r).any()) and (r == 1 or (heads % r != slots % r).any()):
            return {role: moves[role] for role in ("q", "k", "v", "o")}
    raise AssertionError("no moving permutation found")


def derive(base: Path, dst: Path, k: int, edit) -> Path:
    """A copy of the base model with edit(lower layer, upper layer, (H, G, d)) applied to layers
    k and k+1, saved in bf16 like the conftest models."""
    model = load_model(base)
    with torch.no_grad():
        edit(model.model.layers[k], model.model.layers[k + 1], sizes(base))
    model.to(torch.bfloat16).save_pretrained(dst, max_shard_size="60KB")
    return dst


def plant_moved_attention(lower, upper, shape) -> None:
    """upper attention := lower attention re-ordered by a moving allowed permutation + half of
    its own: the exact plan must then move KV groups and query heads, which random layers do not
    guarantee (with the conftest seed, 16 of 18 family/position runs leave q in place)."""
    H, G, d = shape
    A, B = attention_views(lower, H, G, d), attention_views(upper, H, G, d)
    for role, (dim, index) in moving_permutation(H, G, d).items():
        B[role].copy_(A[role].index_select(dim, index) + 0.5 * B[role])
        if f"{role}_bias" in B:  # biases follow their rows
            B[f"{role}_bias"].copy_(A[f"{role}_bias"][index] + 0.5 * B[f"{role}_bias"])


# a forbidden move: the same permutation of the dims inside every q and k head (q.k is kept,
# RoPE pairs are not)
IN_HEAD = torch.tensor([3, 0, 1, 2, 7, 4, 5, 6])


def plant_in_head_permutation(lower, upper, shape) -> None:
    """upper attention := lower attention re-ordered by a moving allowed permutation, then the
    dims inside every q and k head permuted (and Qwen3's q_norm/k_norm with them): an aligner
    that permuted inside heads could reach cost zero by undoing that."""
    H, G, d = shape
    assert d == len(IN_HEAD)
    A, B = attention_views(lower, H, G, d), attention_views(upper, H, G, d)
    for role, (dim, index) in moving_permutation(H, G, d).items():
        B[role].copy_(A[role].index_select(dim, index))
    for role in ("q", "k"):
        B[role].copy_(B[role].reshape(-1, d, B[role].shape[1])[:, IN_HEAD].reshape(B[role].shape))
    for norm in ("q_norm", "k_norm"):
        if hasattr(upper.self_attn, norm):
            getattr(upper.self_attn, norm).weight.copy_(getattr(lower.self_attn, norm).weight[IN_HEAD])


# ---------------------------------------------------------------------------------------------
# 1. the new layer computes what the lower layer computes


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
@pytest.mark.parametrize("k", [0, LAYERS - 2], ids=["bottom", "top"])
def test_new_layer_computes_like_lower_layer(model_factory, tmp_path, family, k):
    base = model_factory(family, layers=LAYERS)  # adjacent random layers are unrelated
    insert_one(base, tmp_path / "o", k)
    assert_computes_like_base(tmp_path / "o", base, k)
    # not vacuous: the alignment did re-order both halves of the layer
    changed = moved(tmp_path / "o", base, k)
    assert any("self_attn" in n for n in changed), changed
    assert any("mlp" in n or "moe" in n for n in changed), changed


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_moved_heads_keep_their_coupling(model_factory, tmp_path, family):
    """KV groups and query heads are moved for sure: q, k, v, o (and biases) must move together."""
    k = 1
    base = derive(model_factory(family, layers=LAYERS), tmp_path / "base", k, plant_moved_attention)
    insert_one(base, tmp_path / "o", k)
    assert_computes_like_base(tmp_path / "o", base, k)
    new_q, new_k = q_k(layer_tensors(tmp_path / "o", k + 1), base)
    lower_q, lower_k = q_k(layer_tensors(base, k), base)
    assert not torch.equal(new_q, lower_q) and not torch.equal(new_k, lower_k)


# ---------------------------------------------------------------------------------------------
# 2. GQA layouts


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["G=1", "G=2", "G=H"])
@pytest.mark.parametrize("k", [0, LAYERS - 2], ids=["bottom", "top"])
def test_coupling_for_every_gqa_layout(model_factory, tmp_path, kv_heads, k):
    base = model_factory("llama", layers=LAYERS, num_key_value_heads=kv_heads)
    base = derive(base, tmp_path / "base", k, plant_moved_attention)
    insert_one(base, tmp_path / "o", k)
    assert_computes_like_base(tmp_path / "o", base, k)
    new_q, _ = q_k(layer_tensors(tmp_path / "o", k + 1), base)
    lower_q, _ = q_k(layer_tensors(base, k), base)
    assert not torch.equal(new_q, lower_q)  # query heads (G=1), groups (G=H) or both moved


# ---------------------------------------------------------------------------------------------
# the check has teeth: illegal moves applied to a correct new layer fail it


def swap_q_groups(layer):  # q's KV groups swapped, k's not
    W = layer.self_attn.q_proj.weight
    W.copy_(W.reshape(2, -1)[[1, 0]].reshape(W.shape))


def swap_q_heads(layer):  # two query heads of one group swapped, o columns not following
    W = layer.self_attn.q_proj.weight
    W.copy_(W.reshape(4, -1)[[1, 0, 2, 3]].reshape(W.shape))


def permute_in_heads(layer):  # the same in-head permutation of q and k: q.k kept, RoPE broken
    for W in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight):
        W.copy_(W.reshape(-1, 8, W.shape[1])[:, IN_HEAD].reshape(W.shape))


def move_v_dims(layer):  # value dims re-ordered, o columns not following
    W = layer.self_attn.v_proj.weight
    W.copy_(W.reshape(2, 8, -1).flip(1).reshape(W.shape))


def move_gate_rows(layer):  # gate neurons re-ordered, up and down not following
    W = layer.mlp.gate_proj.weight
    W.copy_(W.roll(1, dims=0))


@pytest.mark.parametrize(
    "illegal",
    [swap_q_groups, swap_q_heads, permute_in_heads, move_v_dims, move_gate_rows],
    ids=["q groups", "q heads", "in-head dims", "v dims", "gate rows"],
)
def test_illegal_move_fails_the_check(model_factory, tmp_path, illegal):
    base = model_factory("llama", layers=LAYERS)  # 4 heads, 2 KV heads, head_dim 8
    insert_one(base, tmp_path / "o", 0)
    assert_computes_like_base(tmp_path / "o", base, 0)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_computes_like_base(tmp_path / "o", base, 0, edit=illegal)


# ---------------------------------------------------------------------------------------------
# 3. forbidden moves: nothing is permuted inside a q/k head, and query heads stay with their k


def sources(new: torch.Tensor, lower: torch.Tensor) -> list[int]:
    """For each new head (n, d, hidden), the lower head it equals exactly, dims in order."""
    found = []
    for j, head in enumerate(new):
        same = [i for i, h in enumerate(lower) if torch.equal(head, h)]
        assert len(same) == 1, f"new head {j} is no lower head with its dims in the original order"
        found.append(same[0])
    return found


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_exact_alignment_keeps_q_k_heads_whole(model_factory, tmp_path, family):
    k = 1
    base = derive(model_factory(family, layers=LAYERS), tmp_path / "base", k, plant_in_head_permutation)
    insert_one(base, tmp_path / "o", k)
    H, G, _ = sizes(base)
    new_q, new_k = q_k(layer_tensors(tmp_path / "o", k + 1), base)
    lower_q, lower_k = q_k(layer_tensors(base, k), base)
    upper_q, _ = q_k(layer_tensors(base, k + 1), base)
    q_from, k_from = sources(new_q, lower_q), sources(new_k, lower_k)
    assert sorted(q_from) == list(range(H)) and sorted(k_from) == list(range(G))
    # the query heads of new group g are those of the lower group whose k head is new k head g
    r = H // G
    for j, i in enumerate(q_from):
        assert i // r == k_from[j // r], (q_from, k_from)
    # not vacuous: groups were moved (so the pairing could break), and the upper layer's
    # dim-permuted heads, which undoing the forbidden move would reproduce, are not what we got
    assert k_from != list(range(G))
    assert not any(torch.equal(a, b) for a in new_q for b in upper_q)
    if family == "qwen3":  # head norms are never permuted: with alpha 1 they are the lower layer's
        new, lower = layer_tensors(tmp_path / "o", k + 1), layer_tensors(base, k)
        for norm in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            assert torch.equal(new[norm], lower[norm]), norm


def mixture(new: torch.Tensor, lower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients (n_new, n_lower) of each new head as a combination of the lower
    heads with their dims in order, and each fit's residual relative to the head's norm."""
    X, Y = lower.reshape(len(lower), -1).T, new.reshape(len(new), -1).T  # (d*hidden, heads)
    coef = torch.linalg.lstsq(X, Y).solution  # (n_lower, n_new)
    residual = (X @ coef - Y).norm(dim=0) / Y.norm(dim=0)
    return coef.T, residual


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("planted", [True, False], ids=["in-head-permuted upper", "random upper"])
def test_sinkhorn_alignment_mixes_whole_q_k_heads(model_factory, tmp_path, family, planted):
    """Entropic plans mix heads: each new q (k) head must be a convex combination of whole lower q
    (k) heads, dims in order; the weight a new query head takes from a lower KV group is the weight
    its group's k head takes from that group's k head."""
    k = 1
    base = model_factory(family, layers=LAYERS)
    if planted:
        base = derive(base, tmp_path / "base", k, plant_in_head_permutation)
    insert_one(base, tmp_path / "o", k, solver="sinkhorn")
    H, G, _ = sizes(base)
    r = H // G
    new_q, new_k = q_k(layer_tensors(tmp_path / "o", k + 1), base)
    lower_q, lower_k = q_k(layer_tensors(base, k), base)
    cq, res_q = mixture(new_q, lower_q)
    ck, res_k = mixture(new_k, lower_k)
    # bf16 rounding of the output is 2^-9 relative; a head with permuted dims is ~1 away
    assert res_q.max() < 1e-2 and res_k.max() < 1e-2, (res_q, res_k)
    for c in (cq, ck):
        assert c.min() > -1e-2, c
        torch.testing.assert_close(c.sum(1), torch.ones(len(c), dtype=c.dtype), atol=1e-2, rtol=0)
    per_group = cq.reshape(H, G, r).sum(2)  # (new query head, lower KV group)
    torch.testing.assert_close(per_group, ck.repeat_interleave(r, 0), atol=1e-2, rtol=0)
    # the check can tell: the heads of a layer with permuted dims are far from that span
    _, res_bad = mixture(new_q[:, IN_HEAD], lower_q)
    assert res_bad.min() > 0.5, res_bad
