"""Fast checks (seconds) for benchmarks/quality.py: the study's pieces on tiny real up-scales."""

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality as Q  # noqa: E402
from benchmarks import training as T  # noqa: E402
from conftest import load_model  # noqa: E402


@pytest.fixture(scope="module")
def built(model_factory, tmp_path_factory):
    """A 6-layer tiny llama up-scaled as the study does it: insertion at 50% (6 -> 9) and SOLAR
    stacking with overlap 2 ([0,4) + [2,6) -> 8)."""
    base = model_factory("llama", layers=6, tied=True)
    variants = [Q.Variant("copy", "top"), Q.Variant("opt-deus-exact", "bottom"), Q.Variant("average", "top"),
                Q.Variant("stack", None), Q.Variant("base", None)]
    work = tmp_path_factory.mktemp("quality-models")
    return base, Q.build_variants(variants, base, work, "cpu")


def pattern_blocks(n, length=24, vocab=97, seed=0):
    # Windows of one periodic sequence at random offsets: learnable in a few steps.
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (13,), generator=g).repeat(8)
    offs = torch.randint(0, 13, (n,), generator=g)
    return torch.stack([base[o : o + length] for o in offs.tolist()])


def layer_of(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("variant", ["copy", "opt-deus-exact@bottom", "average", "stack"])
def test_manifest_regex_freezes_exactly_the_base_layers(built, variant):
    _, variants = built
    info = variants[variant]
    model = load_model(Path(info["dir"]))
    new = set(info["new_layers"])
    assert new and len(new) < model.config.num_hidden_layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = pattern_blocks(24)
    hist = T.train(model, blocks[:16], blocks[16:], steps=3, lr=1e-2, batch_size=4, seed=0,
                   trainable_regex=info["regex"], warmup=1)

    in_new = {n for n in before if layer_of(n) in new}
    assert set(hist["trainable"]) == in_new  # exactly the new layers' tensors, nothing else
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= in_new  # embeddings, final norm and every base layer unchanged
    assert {layer_of(n) for n in changed} == new  # and every new layer did train


def test_function_preserving_variants_start_at_the_base_loss(built):
    base, variants = built
    held = pattern_blocks(8, seed=1)
    base_loss = T.heldout_loss(load_model(base), held)
    for name in ("copy", "opt-deus-exact@bottom"):
        assert variants[name]["function_preserving"]
        assert T.heldout_loss(load_model(Path(variants[name]["dir"])), held) == pytest.approx(base_loss, abs=1e-6)
    assert not variants["average"]["function_preserving"] and not variants["stack"]["function_preserving"]


def test_runs_summary_table_and_plot(built, tmp_path):
    base, variants = built
    blocks = pattern_blocks(40)
    Q._init_worker(blocks[:32], blocks[32:], 1)
    job = {"steps": 12, "lr": 1e-2, "batch_size": 4, "eval_every": 4, "warmup": 1, "device": "cpu"}
    runs = [Q.run_one(job | {"variant": v, "regime": g, "seed": s, "dir": variants[v]["dir"], "regex": variants[v]["regex"]})
            for v, g in (("copy", "new"), ("copy", "all"), ("base", "all"), ("opt-deus-exact@bottom", "new"))
            for s in (0, 1)]
    for r in runs:
        assert r["eval_steps"] == [0, 4, 8, 12] and r["sec_per_step"] > 0
        assert r["heldout_loss"][-1] < r["heldout_loss"][0]  # the loss decreases, in both regimes
    new0, new1 = runs[0], runs[1]
    assert new0["heldout_loss"][0] == new1["heldout_loss"][0]  # same weights: seeds change only the data order
    assert new0["train_loss"] != new1["train_loss"]
    assert runs[0]["n_trainable"] < runs[2]["n_trainable"] == runs[2]["n_params"]

    base_loss = T.heldout_loss(load_model(base), blocks[32:])
    summary = Q.summarise(runs, variants, base_loss)
    assert [(r["variant"], r["regime"]) for r in summary] == [
        ("copy", "new"), ("copy", "all"), ("base", "all"), ("opt-deus-exact@bottom", "new")]
    row = summary[0]
    finals = [r["heldout_loss"][-1] for r in runs[:2]]
    assert row["final"]["n"] == 2 and row["final"]["min"] == min(finals) and row["final"]["max"] == max(finals)
    assert row["final"]["mean"] == pytest.approx(sum(finals) / 2)
    assert abs(row["step0_minus_base"]) < 1e-6
    assert row["curve"]["min"][-1] <= row["curve"]["mean"][-1] <= row["curve"]["max"][-1]
    # paired per seed: all-layers rows against the base model trained on the same batches
    assert row["paired"] is None and summary[1]["paired"]["vs"] == "base"
    assert summary[1]["paired"]["diffs"] == [runs[2 + s]["heldout_loss"][-1] - runs[4 + s]["heldout_loss"][-1] for s in (0, 1)]

    result = {"settings": {"steps": 12, "batch_size": 4, "context": 24, "seeds": [0, 1]}, "base_heldout_loss": base_loss,
              "data": {"eval_tokens": 8 * 24}, "summary": summary,
              "checks": {"step0_function_preserving": {"variants": ["copy"], "max_abs_diff": 0.0}}}
    result["variants"] = variants
    result["step_times"] = Q.interleaved_step_times({k: variants[k] for k in ("copy", "opt-deus-exact@bottom")},
                                                    ["new", "all"], blocks[:32], rounds=2, batch_size=4, lr=1e-2, device="cpu")
    assert set(result["step_times"]) == {"copy|new", "copy|all", "opt-deus-exact@bottom|new", "opt-deus-exact@bottom|all"}
    assert all(t["n"] == 4 and t["median"] > 0 for t in result["step_times"].values())
    table = Q.markdown(result)
    assert "| copy | new |" in table and "| bottom |" in table and "| top |" in table and "new-only / all" in table
    Q.plot(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_runs_dedupes():
    args = Q.parse_args(["--methods", "base,copy,opt-deus-exact,lesa", "--positions", "top,bottom",
                         "--regimes", "new,all", "--position-regimes", "new,all"])
    pairs, notes = Q.plan_runs(args)
    names = [(v.name, g) for v, g in pairs]
    assert ("base", "new") not in names and ("base", "all") in names  # the base has no new layers
    assert names.count(("opt-deus-exact", "new")) == 1  # the top position is the method row itself
    assert ("opt-deus-exact@bottom", "all") in names
    assert ("lesa", "new") in names
    assert Q.Variant("stack", None).recipe() == {"method": "stack", "overlap": 2}
    assert Q.Variant("copy", "middle").recipe()["count"] == "50%"


def test_data_is_the_base_tokenizer_on_the_by_file_split():
    train, held, info = Q.load_data(Q.DEFAULT_MODEL, context=32, max_bytes=200_000, eval_blocks=6)
    assert train.shape[1] == held.shape[1] == 32 and held.shape[0] == 6 == info["eval_blocks"]
    assert int(train.max()) < 4096 and int(held.max()) < 4096
    assert info["train_files"] > 0 and info["heldout_files"] > 0
