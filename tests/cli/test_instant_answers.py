"""Instant answers: `--help`, `recipes`, `handoff`, `inspect` of an output and every usage error
parse and validate before any heavy import. Each case runs the CLI in a fresh interpreter and
reports which of torch, transformers, datasets, trl and lm_eval it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opt_deus_cli.recipe import load_recipe
from opt_deus_cli.upscale import Options, upscale

HEAVY = ("torch", "transformers", "datasets", "trl", "lm_eval")

# runs the Typer app as the console script does, then writes its exit code and the heavy
# top-level packages present in sys.modules to the file named by OPT_DEUS_PROBE
PROBE = """
import json, os, sys
from opt_deus_cli.cli import app
sys.argv = ["opt-deus", *sys.argv[1:]]
code = 0
try:
    app()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(os.environ["OPT_DEUS_HEAVY"])))
    with open(os.environ["OPT_DEUS_PROBE"], "w") as f:
        json.dump({"code": code, "heavy": loaded}, f)
"""


def probe(tmp_path, *args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stderr) of `opt-deus ARGS` in a fresh interpreter."""
    report = tmp_path / "probe.json"
    env = {**os.environ, "OPT_DEUS_PROBE": str(report), "OPT_DEUS_HEAVY": json.dumps(HEAVY), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    found = json.loads(report.read_text())
    return found["code"], found["heavy"], done.stderr


@pytest.fixture(scope="module")
def output(model_factory, tmp_path_factory):
    """A base model and an up-scaled output of it (with its manifest)."""
    base = model_factory("llama")
    out = tmp_path_factory.mktemp("instant") / "out"
    upscale(base, load_recipe("llama-pro"), out, Options(device="cpu"))
    return base, out


def test_answers_without_heavy_imports(output, tmp_path):
    _, out = output
    for args in (
        ["--help"],
        ["upscale", "--help"],
        ["train", "--help"],
        ["recipes"],
        ["--version"],
        ["handoff", str(out), "--for", "peft"],
        ["handoff", str(out), "--for", "axolotl"],
        ["inspect", str(out)],
        ["inspect", str(out), "--json"],
    ):
        code, heavy, stderr = probe(tmp_path, *args)
        assert code == 0, (args, stderr)
        assert heavy == [], (args, heavy)


def test_usage_errors_without_heavy_imports(output, tmp_path):
    base, out = output
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    fresh = str(tmp_path / "new-out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    train = ["train", str(out), "--data", str(data), "--out", fresh]
    up = ["upscale", str(base), "--recipe", "llama-pro", "--out", fresh]
    cases = [
        (train + ["--steps", "0"], "--steps must be an integer >= 1"),
        (train + ["--lr", "-1"], "--lr must be positive"),
        (train + ["--dtype", "fp8"], "--dtype 'fp8' not understood"),
        (train + ["--device", "tpu"], "--device 'tpu' not understood"),
        (train + ["--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
        (train + ["--eval-every", "5"], "--eval-every needs --eval-data"),
        (["train", str(base), "--data", str(data), "--out", fresh], "no new layers to train"),
        (["train", str(out), "--data", str(tmp_path / "missing.txt"), "--out", fresh], "missing.txt"),
        (["train", str(out), "--data", str(data), "--out", str(taken)], "exists"),
        (train + ["--steps", "x"], "Invalid value for '--steps'"),  # click's own
        (up + ["--dtype", "fp8"], "--dtype 'fp8' not understood"),
        (up + ["--device", "gpu"], "--device 'gpu' not understood"),
        (up + ["--shard-size", "huge"], "shard size 'huge' not understood"),
        (up + ["--memory-budget", "lots"], "--memory-budget 'lots' not understood"),
        (["upscale", str(base), "--recipe", "no-such-recipe", "--out", fresh], "no recipe file or shipped recipe"),
        (["upscale", str(base), "--recipe", "llama-pro"], "no output"),
        (["upscale", str(base), "--recipe", "llama-pro", "--bogus"], "No such option"),
        (["inspect", str(base), "--layer", "3"], "--layer needs an up-scaled model"),
        (["inspect", str(out), "--device", "tpu"], "--device 'tpu' not understood"),
        (["verify", str(base), str(tmp_path / "nowhere")], "does not exist"),
        (["verify", str(base), str(base)], "has no opt-deus manifest"),
        (["verify", str(base), str(out), "--device", "tpu"], "--device 'tpu' not understood"),
        (["handoff", str(out), "--for", "nothing"], "nothing"),
    ]
    for args, message in cases:
        code, heavy, stderr = probe(tmp_path, *args)
        assert code == 2, (args, stderr)
        assert stderr.startswith("error:") and message in stderr, (args, stderr)
        assert heavy == [], (args, heavy)


def test_the_work_still_imports_what_it_needs(output, tmp_path):
    """The probe sees heavy imports where they happen: a dry run reads the config through
    transformers (so a test above that reports none is not blind)."""
    base, _ = output
    code, heavy, stderr = probe(tmp_path, "upscale", str(base), "--recipe", "top-half", "--dry-run")
    assert code == 0, stderr
    assert "transformers" in heavy
