"""A comparison's shared files: a recipe's model is built once and reused while its recipe and base
are unchanged (rebuilt when either changes), and two comparisons writing one --out at once (the
SFT study's `--seeds 0` and `--seeds 1` side by side) leave whole files, no temporaries, and one
comparison.json holding both."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import SHIPPED_MODEL, edit_tensors, snapshot
from opt_deus_cli.compare.runner import build_model, run_comparison
from opt_deus_cli.compare.spec import CompareSpec, load_or_start, write_json_atomic
from opt_deus_cli.errors import UsageError
from opt_deus_cli.output import current_umask
from opt_deus_cli.recipe import load_recipe
from opt_deus_cli.training import TrainOptions


@pytest.fixture
def upscales(monkeypatch) -> list[str]:
    """The output directory of every up-scaling done from now on (the real one runs)."""
    import opt_deus_cli.upscale as upscale_module

    real, calls = upscale_module.upscale, []

    def counting(base, recipe, out, options):
        calls.append(Path(out).name)
        return real(base, recipe, out, options)

    monkeypatch.setattr(upscale_module, "upscale", counting)
    return calls


def spec_for(tmp_path: Path, seeds: tuple[int, ...], lr: float = 1e-3) -> CompareSpec:
    text = (SHIPPED_MODEL / "heldout.txt").read_text()
    data, heldout = tmp_path / "train.txt", tmp_path / "eval.txt"
    if not data.exists():
        data.write_text(text[:6000])
        heldout.write_text(text[-2000:])
    options = TrainOptions(steps=1, seq_len=32, batch_size=2, lr=lr, device="cpu", eval_data=(heldout,), eval_every=1)
    return CompareSpec(
        base=SHIPPED_MODEL,
        recipes={"upper-copy": load_recipe("upper-copy")},
        data=(data,),
        options=options,
        seeds=seeds,
        upscale_device="cpu",
    )


@pytest.mark.slow
def test_another_seed_reuses_the_built_model(tmp_path, upscales):
    out = tmp_path / "cmp"
    run_comparison(spec_for(tmp_path, (0,)), out, say=lambda line: None)
    assert upscales == ["upper-copy"]
    model = out / "models" / "upper-copy"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model.iterdir()}
    outcome = run_comparison(spec_for(tmp_path, (0, 1)), out, say=lambda line: None)
    assert upscales == ["upper-copy"]  # not built again
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model.iterdir()} == before
    assert outcome["ran"] == 1 and outcome["skipped"] == 1
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1]


def test_a_changed_recipe_or_base_is_built_again(model, tmp_path, upscales):
    out = tmp_path / "models" / "m"
    first = build_model(model, load_recipe("llama-pro"), out, device="cpu")
    kept = snapshot(out)
    assert build_model(model, load_recipe("llama-pro"), out, device="cpu") == first
    assert upscales == ["m"] and snapshot(out) == kept  # same recipe and base: reused, untouched
    build_model(model, load_recipe("upper-copy"), out, device="cpu")
    assert upscales == ["m", "m"]  # another recipe: rebuilt
    changed = build_model(model, load_recipe("upper-copy"), out, device="cpu")
    assert upscales == ["m", "m"] and changed["recipe"]["copy"]["neighbour"] == "upper"
    # the base's weights changed in place, every file keeping its size: only the sha256 tells
    sizes = {p.name: p.stat().st_size for p in model.iterdir()}
    index = (model / "model.safetensors.index.json").read_bytes()
    edit_tensors(model, lambda name, tensor: tensor + 1 if name.endswith("input_layernorm.weight") else tensor)
    (model / "model.safetensors.index.json").write_bytes(index)  # as it was: only the weights changed
    assert {p.name: p.stat().st_size for p in model.iterdir()} == sizes
    build_model(model, load_recipe("upper-copy"), out, device="cpu")
    assert upscales == ["m", "m", "m"]


def test_atomic_writes_at_once_leave_whole_json_and_no_temporaries(tmp_path):
    path = tmp_path / "comparison.json"
    errors = []

    def write(n: int) -> None:
        try:
            for i in range(40):
                write_json_atomic(path, {"writer": n, "i": i, "pad": "x" * (2000 * n)})
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    saved = json.loads(path.read_text())
    assert saved["i"] == 39 and len(saved["pad"]) == 2000 * saved["writer"]
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as open() makes it, not mkstemp's 0600


def test_two_comparisons_starting_at_once_add_up_or_are_refused(tmp_path):
    """Started side by side on one --out: --seeds 0 and --seeds 1 both land in comparison.json;
    one with other settings is refused naming the setting, and changes nothing."""
    out = tmp_path / "cmp"
    specs = [spec_for(tmp_path, (seed,)) for seed in range(6)]
    barrier, errors = threading.Barrier(len(specs)), []

    def start(spec: CompareSpec) -> None:
        barrier.wait()
        try:
            load_or_start(spec, out)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((out / "comparison.json").read_text())["seeds"] == list(range(6))
    assert [p.name for p in out.iterdir()] == ["comparison.json"]
    with pytest.raises(UsageError, match=r"training\.lr"):
        load_or_start(spec_for(tmp_path, (7,), lr=0.5), out)
    assert json.loads((out / "comparison.json").read_text())["seeds"] == list(range(6))
