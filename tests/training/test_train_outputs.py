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
    assert "model.safetensors" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}, modes


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_nothing_beside_out(upscaled, corpus, tmp_path, interrupt):
    """Ctrl-C (or a crash) inside the training loop: no OUT, no Trainer work directory, no lock."""

    def stop_at_step_one(done: int, total: int) -> None:
        if done == 1:
            raise interrupt("stopped")

    with pytest.raises(interrupt):
        train(upscaled, [corpus], tmp_path / "out", quick(steps=3), progress=stop_at_step_one)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
