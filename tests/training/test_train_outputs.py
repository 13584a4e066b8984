"""What `opt-deus train` leaves on disk and says (issue 23): file modes that follow the umask, no
leftovers after an interrupt, divergence warned about and recorded, a model card of its own and
only a model's files carried over, progress named by phase. Runs of the real Trainer on the
shipped tiny LLaMA up-scaled (8 -> 10 layers)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import SHIPPED_MODEL
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.training import TrainOptions, train
from opt_deus_cli.upscale import Options, upscale

TEXT = (SHIPPED_MODEL / "heldout.txt").read_text()


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shipped") / "deeper"
    upscale(SHIPPED_MODEL, parse_recipe({"method": "copy", "positions": [6, 7]}), out, Options(device="cpu"))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "train.txt").write_text(TEXT[:6000])
    return d / "train.txt"


def quick(**kw) -> TrainOptions:
    return TrainOptions(**{"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "device": "cpu", **kw})


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_trained_files_follow_the_umask(upscaled, corpus, tmp_path, umask):
    previous = os.umask(umask)
    try:
        train(upscaled, [corpus], tmp_path / "out", quick())
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    written = {"model.safetensors", "opt-deus-manifest.json", "README.md"}  # as open() makes them
    assert {name: modes[name] for name in written} == {name: 0o666 & ~umask for name in written}, modes
    for name in set(modes) - written:  # copied from the input: its modes, as upscale's side files keep the base's
        assert modes[name] == stat.S_IMODE((upscaled / name).stat().st_mode), name


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_nothing_beside_out(upscaled, corpus, tmp_path, interrupt):
    """Ctrl-C (or a crash) inside the training loop: no OUT, no Trainer work directory, no lock."""

    def stop_at_step_one(phase: str, done: int, total: int | None) -> None:
        if done == 1:
            raise interrupt("stopped")

    with pytest.raises(interrupt):
        train(upscaled, [corpus], tmp_path / "out", quick(steps=3), progress=stop_at_step_one)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_divergence_names_what_went_wrong():
    from opt_deus_cli.training.run import divergence

    def rows(losses, norms):
        return [{"step": i + 1, "loss": x, "grad_norm": g} for i, (x, g) in enumerate(zip(losses, norms))]

    assert divergence(rows([5.3, 4.9, 4.1], [1.2, 0.8, 0.7])) == []
    assert divergence(rows([5.3, 5.5, 5.4], [1.0, 1.0, 1.0])) == []  # noise, not divergence
    found = divergence(rows([5.28, 7.0, 8.32], [3.0, 0.0, 0.0]))
    assert len(found) == 2 and "final training loss 8.3200 is well above the first 5.2800" in found[0]
    assert "gradient norm collapsed to 0 (step 3)" in found[1]
    found = divergence(rows([5.3, float("nan")], [2.0, float("inf")]))
    assert "loss became nan at step 2" in found[0] and "gradient norm became inf at step 2" in found[1]


@pytest.mark.slow
def test_a_diverged_run_is_warned_about_and_recorded(upscaled, corpus, tmp_path):
    from typer.testing import CliRunner

    from opt_deus_cli.cli import app
    from opt_deus_cli.manifest import read_manifest

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(upscaled),
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "1e30",
            "--device",
            "cpu",
        ],
    )
    # the run: loss 5.11 -> 8.32, then a gradient norm of 0; finite but wrecked weights
    assert result.exit_code == 0, result.output
    record = read_manifest(out).training
    assert len(record["divergence"]) == 2 and "well above the first" in record["divergence"][0]
    assert "gradient norm collapsed to 0" in record["divergence"][1]
    for problem in record["divergence"]:
        assert f"warning: {problem}" in " ".join(result.output.split()), result.output


@pytest.mark.slow
def test_the_save_check_refuses_non_finite_trained_weights(upscaled, corpus, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from opt_deus_cli.errors import OptDeusError
    from opt_deus_cli.training.save import check_saved

    out = tmp_path / "out"
    train(upscaled, [corpus], out, quick())
    for value in (float("nan"), float("inf")):
        doctored = tmp_path / f"doctored-{value}"
        shutil.copytree(out, doctored)
        weights = load_file(doctored / "model.safetensors")
        weights["model.layers.9.mlp.down_proj.weight"][0, 0] = value  # a new (trained) layer
        save_file(weights, str(doctored / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(OptDeusError, match=r"model.layers.9.mlp.down_proj.weight .*NaN or Inf"):
            check_saved(upscaled, doctored, lambda name: not name.startswith(("model.layers.7.", "model.layers.9.")))


@pytest.mark.slow
def test_progress_names_each_phase_in_order(upscaled, corpus, tmp_path):
    seen: list[tuple[str, int, int | None]] = []
    train(upscaled, [corpus], tmp_path / "out", quick(), progress=lambda *call: seen.append(call))
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    assert phases == [
        "reading data",
        "tokenizing",
        "loading model",
        "training (new layers)",
        "gathering weights",
        "saving",
        "checking",
    ]
    steps = [(done, total) for phase, done, total in seen if phase.startswith("training")]
    assert steps == [(0, 2), (1, 2), (2, 2)]
    assert all(total is None for phase, _, total in seen if not phase.startswith("training"))


def test_plain_progress_lines_show_the_time_left(monkeypatch, capsys):
    from opt_deus_cli.cli import common

    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    lines = []
    monkeypatch.setattr(common.console, "print", lambda text, **kw: lines.append(text))
    bar = common.PlainProgress()
    task = bar.add_task("starting", total=None)
    bar.update(task, completed=0)
    clock[0] = 105.0
    bar.update(task, description="training", completed=0, total=10)
    clock[0] = 125.0  # 2 of 10 steps in 20 s: 80 s left
    bar.update(task, completed=2)
    assert lines == ["[0s] starting", "[0/10 5s] training", "[2/10 25s eta 80s] training"]


@pytest.mark.slow
def test_the_first_progress_line_comes_before_the_heavy_imports(upscaled, corpus, tmp_path):
    """In a log (stderr not a terminal) the first line is printed at once, not after torch loads."""
    import subprocess
    import sys
    import time

    command = [
        sys.executable,
        "-c",
        "from opt_deus_cli.cli import app; app()",
        "train",
        str(upscaled),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    first = process.stderr.readline()
    first_at = time.monotonic() - started
    _, rest = process.communicate(timeout=600)
    assert process.returncode == 0, first + rest
    assert "starting (importing torch, transformers)" in first
    assert "import torch" not in first and first_at < 5.0  # the CLI alone; torch and transformers take longer
    order = [
        phase
        for phase in ("reading data", "tokenizing", "loading model", "training (new layers)", "saving", "checking")
        if phase in rest
    ]
    assert order == ["reading data", "tokenizing", "loading model", "training (new layers)", "saving", "checking"]
    assert [rest.index(p) for p in order] == sorted(rest.index(p) for p in order)


def test_a_phase_without_a_count_shows_none(monkeypatch):
    """After the training steps, `saving` is not shown as 0/20."""
    from opt_deus_cli.cli import common

    lines = []
    monkeypatch.setattr(common.console, "print", lambda text, **kw: lines.append(text))
    bar = common.PlainProgress()
    task = bar.add_task("training", total=20)
    bar.update(task, completed=20)
    bar.remove_task(task)
    task = bar.add_task("saving", total=None)
    bar.update(task, completed=0)
    assert lines[-1].endswith("s] saving") and "/" not in lines[-1]
