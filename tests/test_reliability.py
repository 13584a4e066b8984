"""Reliability and security through the real command line: every bad input is refused with one
line and the right exit code, leaving nothing at the output location; a run that fails, is
interrupted or races another never leaves a half-written result or loses an old one; the same
input gives the same bytes; a checkpoint is never unpickled and a recipe never runs code."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from opt_deus_cli.cli import app

runner = CliRunner()
OPT_DEUS = str(Path(sys.executable).parent / "opt-deus")
INDEX = "model.safetensors.index.json"
MANIFEST = "opt-deus-manifest.json"


# ---- helpers -------------------------------------------------------------------------------

def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def upscale(model, out, *extra, recipe="llama-pro"):
    return cli("upscale", model, "--recipe", recipe, "--out", out, "--device", "cpu", *extra)


# a plain progress line (stderr is not a terminal here): "[5/12 3s] layer 4 (new: ...)"
PROGRESS_LINE = re.compile(r"\[(\d+/\d+ )?\d+s\] ")


def messages(stderr: str) -> list[str]:
    """stderr without its progress lines: what the run had to say."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


def refused(result, code: int, *fragments: str) -> str:
    """The run failed with exit `code` and exactly one line on stderr besides progress, `error: ...`."""
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """What is at or beside OUT_DIR: the directory itself, temporary directories, the lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def fake_result(out: Path) -> dict[str, str]:
    """An existing opt-deus output (as far as --overwrite cares) whose survival is checked."""
    out.mkdir()
    (out / "opt-deus-manifest.json").write_text("{}\n")
    (out / "model.safetensors").write_bytes(b"the old result")
    return snapshot(out)


@pytest.fixture
def model(model_factory, tmp_path) -> Path:
    """A private copy of the tiny sharded llama (6 layers, 2 shards) that a test may damage."""
    return Path(shutil.copytree(model_factory("llama"), tmp_path / "model"))


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def edit_tensors(model_dir: Path, edit) -> None:
    """Rewrite every shard with edit(name, tensor) -> tensor, or None to drop the tensor."""
    index_path = model_dir / INDEX
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        kept = {}
        for name, tensor in tensors.items():
            new = edit(name, tensor)
            if new is None:
                del index["weight_map"][name]
            else:
                kept[name] = new
        save_file(kept, str(model_dir / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def shard_holding(model_dir: Path, tensor: str) -> Path:
    return model_dir / json.loads((model_dir / INDEX).read_text())["weight_map"][tensor]


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (the data section is kept as it is)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + size:])


class Unpickled:
    """Unpickling this runs code (touches a file): it proves opt-deus never unpickles."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


# ---- bad model directories -----------------------------------------------------------------

def _no_model_type(m):
    config = json.loads((m / "config.json").read_text())
    del config["model_type"]
    (m / "config.json").write_text(json.dumps(config))


def _quantized(m):
    config = json.loads((m / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (m / "config.json").write_text(json.dumps(config))


def _index_names(m, name):
    index = json.loads((m / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = name
    (m / INDEX).write_text(json.dumps(index))


def _symlink_leaving(m):
    shard = shard_holding(m, "model.norm.weight")
    outside = m.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)


def _side_file_leaving(m):
    secret = m.parent / "secret.txt"
    secret.write_text("not for the output")
    (m / "tokenizer.json").symlink_to(secret)


def _truncated(m):
    shard = shard_holding(m, "model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:-40])


def _header_lies(m):
    def lie(header):
        header["model.layers.1.self_attn.q_proj.weight"]["shape"] = [32, 64]
    edit_header(shard_holding(m, "model.layers.1.self_attn.q_proj.weight"), lie)


def _drop(name):
    return lambda m: edit_tensors(m, lambda n, t: None if n == name else t)


def _reshape(name, shape):
    return lambda m: edit_tensors(m, lambda n, t: torch.zeros(shape, dtype=t.dtype) if n == name else t)


def _config(**changes):
    def apply(m):
        config = json.loads((m / "config.json").read_text())
        config.update(changes)
        (m / "config.json").write_text(json.dumps(config))
    return apply


BAD_MODELS = {
    "missing": (lambda m: m / "nope", "does not exist"),
    "not a directory": (lambda m: m / "config.json", "is not a directory"),
    "no config.json": (lambda m: (m / "config.json").unlink(), "has no config.json"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{'model_type': llama"), "not valid JSON"),
    "config a directory": (lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()), "has no config.json"),
    "no model_type": (_no_model_type, "has no 'model_type'"),
    "model_type not a string": (_config(model_type=["llama"]), "'model_type' must be a string"),
    "no vocab_size": (_config(vocab_size=None), "Field 'vocab_size' expected int"),
    "quantized": (_quantized, "quantized"),
    "index not JSON": (lambda m: (m / INDEX).write_text("{\"weight_map\": "), "not a valid safetensors index"),
    "index not a map": (lambda m: (m / INDEX).write_text('{"weight_map": {"lm_head.weight": 3}}'), "not a valid safetensors index"),
    "index names a missing shard": (lambda m: _index_names(m, "model-00009-of-00009.safetensors"), "missing"),
    "index name with ../": (lambda m: _index_names(m, "../model/model-00001-of-00002.safetensors"), "not a plain file name"),
    "index name absolute": (lambda m: _index_names(m, str(m / "model-00001-of-00002.safetensors")), "not a plain file name"),
    "symlink leaving": (_symlink_leaving, "symlink leaving"),
    "side file symlink leaving": (_side_file_leaving, "tokenizer.json is a symlink leaving"),
    "truncated shard": (_truncated, "tensor model.norm.weight"),
    "header lies about sizes": (_header_lies, "tensor model.layers.1.self_attn.q_proj.weight"),
    "block tensor missing": (_drop("model.layers.3.mlp.up_proj.weight"), "tensor model.layers.3.mlp.up_proj.weight is missing"),
    "embedding missing": (_drop("model.embed_tokens.weight"), "tensor model.embed_tokens.weight is missing"),
    "lm_head missing": (_drop("lm_head.weight"), "tensor lm_head.weight is missing"),
    "final norm missing": (_drop("model.norm.weight"), "tensor model.norm.weight is missing"),
    "block tensor wrong shape": (_reshape("model.layers.2.self_attn.k_proj.weight", (8, 32)), "tensor model.layers.2.self_attn.k_proj.weight has shape [8, 32]"),
    "lm_head wrong shape": (_reshape("lm_head.weight", (96, 32)), "tensor lm_head.weight has shape [96, 32]"),
    "config disagrees with shapes": (_config(intermediate_size=64), "tensor model.layers.0.mlp."),
    "config fewer layers than tensors": (_config(num_hidden_layers=4), "model.layers.4."),
    "config more layers than tensors": (_config(num_hidden_layers=7), "tensor model.layers.6."),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_dir_is_refused(model, tmp_path, case):
    damage, message = BAD_MODELS[case]
    given = damage(model)
    model_dir = given if isinstance(given, Path) else model
    out = tmp_path / "out"
    refused(upscale(model_dir, out), 1, message)
    assert leftovers(out) == []


@pytest.mark.parametrize("suffix", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_weights_are_never_unpickled(model, tmp_path, suffix):
    for p in model.glob("*.safetensors"):
        p.unlink()
    (model / INDEX).unlink()
    sentinel = tmp_path / "code-ran"
    (model / suffix).write_bytes(pickle.dumps(Unpickled(sentinel)))
    out = tmp_path / "out"
    line = refused(upscale(model, out), 1, "never unpickles", "safetensors", suffix)
    assert "save_pretrained(safe_serialization=True)" in line
    assert not sentinel.exists()
    assert leftovers(out) == []


def test_hub_cache_symlinks_are_followed(model, tmp_path):
    """The Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<hash>: not "leaving"."""
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in sorted(model.iterdir()):
        blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / blob.name)
    result = upscale(snap, tmp_path / "out")
    assert result.exit_code == 0, result.output


# ---- NaN and Inf ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("recipe", ["llama-pro", "average"])
def test_nonfinite_source_is_refused_unless_allowed(model, tmp_path, value, recipe):
    bad = "model.layers.5.mlp.up_proj.weight"  # layer 5 is a source for both recipes

    def poison(name, t):
        if name == bad:
            t = t.clone()
            t[0, 0] = value
        return t

    edit_tensors(model, poison)
    recipe = recipe if recipe == "llama-pro" else write_recipe(tmp_path, "method: average\npositions: top\ncount: 1\n")
    out = tmp_path / "out"
    refused(upscale(model, out, recipe=recipe), 1, bad, "NaN or Inf", "--allow-nonfinite")
    assert leftovers(out) == []
    assert upscale(model, out, "--allow-nonfinite", recipe=recipe).exit_code == 0


@pytest.mark.parametrize("recipe", ["top-half", "lesa"])
def test_nonfinite_is_never_suggested_where_it_cannot_help(model, tmp_path, recipe):
    """OpT-DeUS aligns and LESA learns from the source weights: NaN there cannot be passed
    through, so the error does not suggest --allow-nonfinite, and the flag is refused up front."""
    bad = "model.layers.4.mlp.up_proj.weight"  # a source of the top half's first new layer
    edit_tensors(model, lambda n, t: torch.full_like(t, float("nan")) if n == bad else t)
    out = tmp_path / "out"
    line = refused(upscale(model, out, recipe=recipe), 1, bad, "NaN or Inf")
    assert "pass --allow-nonfinite" not in line
    line = refused(upscale(model, out, "--allow-nonfinite", recipe=recipe), 2, "--allow-nonfinite cannot help")
    assert "fix the checkpoint" in line and leftovers(out) == []


def test_nonfinite_outside_the_sources_is_not_a_problem(model, tmp_path):
    edit_tensors(model, lambda n, t: torch.full_like(t, float("nan")) if n == "model.layers.0.mlp.up_proj.weight" else t)
    result = upscale(model, tmp_path / "out", recipe=write_recipe(tmp_path, "method: average\npositions: top\ncount: 1\n"))
    assert result.exit_code == 0, result.output


# ---- bad recipes ---------------------------------------------------------------------------

BAD_RECIPES = [
    ("method: [copy\n", "not valid YAML at line"),
    ("method: copy\x1f\n", "not valid YAML: special characters"),
    ("- method: copy\n", "expected a YAML mapping"),
    ("", "expected a YAML mapping"),
    ("method: copy\npositions: top\ncuont: 2\n", "did you mean 'count'"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpah: 0.5}\n", "did you mean 'alpha'"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilom: 0.1}\n", "did you mean 'epsilon'"),
    ("method: cpoy\npositions: top\ncount: 1\n", "'method' must be one of"),
    ("positions: top\ncount: 1\n", "'method' must be one of"),
    ("method: copy\npositions: top\ncount: many\n", "whole number or a percentage"),
    ("method: copy\npositions: top\ncount: 1.5\n", "whole number or a percentage"),
    ("method: copy\npositions: top\ncount: true\n", "whole number or a percentage"),
    ("method: copy\npositions: 3\n", "positions must be one of"),
    ("method: copy\npositions: [1, two]\n", "positions must be one of"),
    ("method: copy\npositions: []\n", "positions must be one of"),
    ("method: copy\npositions: [1]\ncount: true\n", "count"),
    ("method: copy\npositions: top\ncount: 1\nzero_init: o_proj\n", "zero_init must be a list"),
    ("method: copy\npositions: top\ncount: 1\nzero_init: [foo_proj]\n", "not a projection"),
    ("method: average\npositions: top\ncount: 1\nfusion: 0.5\n", "fusion must be a mapping"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: small}\n", "alignment.epsilon must be a positive number"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {solver: magic}\n", "solver"),
    ("method: copy\npositions: top\ncount: 1\ndescription: 5\n", "'description' must be a string"),
    ("method: copy\npositions: top\ncount: 1\noverlap: 2\n", "does not apply to method 'copy'"),
    ("method: copy\npositions: top\ncount: 0\n", "must be >= 1"),
    ("method: copy\npositions: top\ncount: -2\n", "must be >= 1"),
    ("method: copy\npositions: top\ncount: '0%'\n", "percentage"),
    ("method: copy\npositions: top\ncount: '1%'\n", "less than one layer"),
    ("method: stack\noverlap: 0\n", "must be >= 1"),
    ("method: stack\noverlap: 6\n", "must be between 1 and 5"),
    ("method: stack\nslices: [[3, 3]]\n", "empty or negative"),
    ("method: stack\nslices: [[0, 9]]\n", "goes past the 6 layers"),
    ("method: copy\npositions: [6]\n", "out of range"),
    ("method: copy\npositions: [-1]\n", ">= 0"),
    ("method: average\npositions: [5]\n", "out of range"),
    ("method: average\npositions: top\ncount: 6\n", "too large"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: 0}\n", "epsilon must be a positive number"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: -0.1}\n", "epsilon must be a positive number"),
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: .nan}\n", "epsilon must be a positive number"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: -0.1}\n", "alpha must be a number in [0, 1]"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: 1.5}\n", "alpha must be a number in [0, 1]"),
    ("method: opt-deus\npositions: top\ncount: 1\nfusion: {alpha: .nan}\n", "alpha must be a number in [0, 1]"),
    ("method: average\npositions: top\ncount: 1\nfusion: {alpha: half}\n", "alpha must be a number in [0, 1]"),
    # settings the chosen mode or solver would ignore (and the manifest would record as if used)
    *[(f"method: opt-deus\npositions: top\ncount: 1\nalignment: {{mode: reference, {key}: {value}}}\n",
       f"alignment.{key} is not used: mode reference runs the published solver")
      for key, value in (("solver", "sinkhorn"), ("max_iter", 10), ("tol", 0.1), ("cost", "cosine"), ("epsilon", 0.5))],
    *[(f"method: opt-deus\npositions: top\ncount: 1\nalignment: {{solver: exact, {key}: {value}}}\n",
       f"alignment.{key} is not used: solver exact") for key, value in (("max_iter", 10), ("tol", 0.1), ("epsilon", 0.5))],
    ("method: opt-deus\npositions: top\ncount: 1\nalignment: {epsilon: 0.5}\n", "alignment.epsilon is not used: solver exact"),
]


@pytest.mark.parametrize("text, message", BAD_RECIPES)
def test_bad_recipe_is_refused(model_factory, tmp_path, text, message):
    out = tmp_path / "out"
    refused(upscale(model_factory("llama"), out, recipe=write_recipe(tmp_path, text)), 2, message)
    assert leftovers(out) == []


def test_recipe_never_runs_code(model_factory, tmp_path):
    sentinel = tmp_path / "code-ran"
    text = f"method: !!python/object/apply:os.system ['touch {sentinel}']\npositions: top\ncount: 1\n"
    out = tmp_path / "out"
    refused(upscale(model_factory("llama"), out, recipe=write_recipe(tmp_path, text)), 2, "not valid YAML")
    assert not sentinel.exists() and leftovers(out) == []


def test_recipe_file_missing(model_factory, tmp_path):
    refused(upscale(model_factory("llama"), tmp_path / "out", recipe=tmp_path / "nope.yaml"), 2, "not found")
    refused(upscale(model_factory("llama"), tmp_path / "out", recipe="llama_pro"), 2, "did you mean 'llama-pro'")


# ---- bad output locations ------------------------------------------------------------------

def test_existing_output_is_kept_without_overwrite(model_factory, tmp_path):
    out = tmp_path / "out"
    before = fake_result(out)
    refused(upscale(model_factory("llama"), out), 2, "already exists", "--overwrite")
    assert snapshot(out) == before and leftovers(out) == ["out"]


def test_output_inside_the_model_dir(model, tmp_path):
    before = sorted(p.name for p in model.iterdir())
    refused(upscale(model, model / "deeper"), 2, "inside the model directory")
    refused(upscale(model, model, "--overwrite"), 2, "inside the model directory")
    assert sorted(p.name for p in model.iterdir()) == before


def test_output_containing_the_model_dir(model_factory, tmp_path):
    out = tmp_path / "out"
    base = Path(shutil.copytree(model_factory("llama"), out / "base"))
    before = snapshot(base)
    refused(upscale(base, out, "--overwrite"), 2, "contains the model directory")
    assert snapshot(base) == before and leftovers(out) == ["out"]


def test_overwrite_only_replaces_an_opt_deus_output(model_factory, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    refused(upscale(model_factory("llama"), out, "--overwrite"), 2, "not an opt-deus output")
    assert (out / "thesis.tex").read_text() == "years of work" and leftovers(out) == ["home"]


def test_output_is_a_file(model_factory, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    refused(upscale(model_factory("llama"), out, "--overwrite"), 2, "not a directory")
    assert out.read_text() == "x" and leftovers(out) == ["out"]


def test_output_parent_missing(model_factory, tmp_path):
    refused(upscale(model_factory("llama"), tmp_path / "no" / "out"), 2, "does not exist")
    assert not (tmp_path / "no").exists()


def test_output_not_writable_for_root_too(model_factory):
    # sysfs refuses new files even to root, so this holds wherever the tests run
    refused(upscale(model_factory("llama"), "/sys/opt-deus-test-out"), 2, "/sys/opt-deus-test-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_not_writable(model_factory, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        refused(upscale(model_factory("llama"), parent / "out"), 2, "permission denied")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_output_dir_gets_the_mode_mkdir_would(model_factory, tmp_path, umask, mode):
    """Not the temporary directory's 0700 (kept through the rename): on a shared machine others
    must be able to read the checkpoint when the umask says so."""
    previous = os.umask(umask)
    try:
        assert upscale(model_factory("llama"), tmp_path / "out").exit_code == 0
        (tmp_path / "by-mkdir").mkdir()
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode == (tmp_path / "by-mkdir").stat().st_mode & 0o777
    written = [f for f in (tmp_path / "out").iterdir() if f.suffix == ".safetensors" or f.name in ("config.json", MANIFEST)]
    for file in written:  # the files opt-deus writes, as open() makes them (side files keep the base's mode)
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


# ---- faults during a run (real processes) --------------------------------------------------

def spawn(*args, limit_file_size: int | None = None) -> subprocess.Popen:
    command = [OPT_DEUS, "upscale", *map(str, args), "--device", "cpu"]
    if limit_file_size is not None:  # set in a launcher, not preexec_fn (unsafe with threads)
        launcher = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
                    "os.execv(sys.argv[2], sys.argv[2:])")
        command = [sys.executable, "-c", launcher, str(limit_file_size), *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_line(stderr: str, start: str) -> str:
    lines = messages(stderr)
    assert len(lines) == 1 and lines[0].startswith(start), stderr
    return lines[0]


def test_disk_full_keeps_the_old_output(model_factory, tmp_path):
    out = tmp_path / "out"
    before = fake_result(out)
    # every shard of the new result is bigger than this; the lock and temp directory are not files
    run = spawn(model_factory("llama"), "--recipe", "llama-pro", "--out", out, "--overwrite", limit_file_size=16_000)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    assert "File too large" in one_line(stderr, "error:")
    assert snapshot(out) == before and leftovers(out) == ["out"]


BIG_RECIPE = "method: average\npositions: top\ncount: 4\n"


@pytest.fixture(scope="session")
def big_model(tmp_path_factory) -> Path:
    """A llama of 50 MB, written directly (no transformers init): big enough that a run takes
    a second or so after it starts writing, so it can be interrupted mid-way."""
    path = tmp_path_factory.mktemp("big")
    hidden, inter, layers, vocab = 512, 1408, 8, 256
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False, dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=bf16),
               "model.norm.weight": torch.ones(hidden, dtype=bf16), "lm_head.weight": torch.zeros(vocab, hidden, dtype=bf16)}
    shapes = {"self_attn.q_proj": (512, hidden), "self_attn.k_proj": (256, hidden), "self_attn.v_proj": (256, hidden),
              "self_attn.o_proj": (hidden, 512), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        tensors.update({f"model.layers.{i}.{m}.weight": torch.randn(s, dtype=bf16) for m, s in shapes.items()})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=bf16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "big.yaml").write_text(BIG_RECIPE)
    return path


def writing(out: Path) -> bool:
    """Whether a run has a temporary directory beside `out` with bytes in it (it is mid-way)."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        try:
            if any(p.stat().st_size > 0 for p in tmp.iterdir()):
                return True
        except FileNotFoundError:
            pass
    return False


def when_writing(runs: dict[Path, subprocess.Popen], act, timeout: float = 60) -> None:
    """act(out, run) for each run as soon as it is mid-way through writing its output."""
    waiting, deadline = dict(runs), time.monotonic() + timeout
    while waiting:
        assert time.monotonic() < deadline, "a run never started writing"
        for out, run in list(waiting.items()):
            assert run.poll() is None, run.communicate()
            if writing(out):
                act(out, run)
                del waiting[out]
        time.sleep(0.005)


def big_run(big_model: Path, out: Path, *extra) -> tuple:
    return (big_model, "--recipe", big_model / "big.yaml", "--out", out, "--overwrite", *extra)


def test_interrupted_run_keeps_the_old_output(big_model, tmp_path):
    """Ctrl-C and SIGTERM mid-write (both runs at once, to save a process start each)."""
    signals = {tmp_path / "int": signal.SIGINT, tmp_path / "term": signal.SIGTERM}
    before = {out: fake_result(out) for out in signals}
    runs = {out: spawn(*big_run(big_model, out, "--dtype", "float32")) for out in signals}
    when_writing(runs, lambda out, run: run.send_signal(signals[out]))
    for out, run in runs.items():
        _, stderr = run.communicate(timeout=60)
        sigterm = signals[out] == signal.SIGTERM
        assert run.returncode == (143 if sigterm else 130), stderr
        line = one_line(stderr, "terminated:" if sigterm else "interrupted:")
        assert f"the previous output {out} is intact" in line, line  # not "nothing was left" there
        assert snapshot(out) == before[out] and leftovers(out) == [out.name]
    # the same command again succeeds
    out = tmp_path / "term"
    result = cli("upscale", *big_run(big_model, out, "--dtype", "float32"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert leftovers(out) == ["term"] and snapshot(out) != before[out]
    shutil.rmtree(out)


def test_locked_output_is_refused(model_factory, tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.opt-deus.lock"
    with open(lock, "w") as held:  # as a run writing `out` holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(upscale(model_factory("llama"), out), 1, "another opt-deus run is writing")
        assert leftovers(out) == [lock.name]
    assert upscale(model_factory("llama"), out).exit_code == 0
    assert leftovers(out) == ["out"]


def test_lock_is_taken_on_the_current_file(tmp_path, monkeypatch):
    """A finishing run unlinks the lock file; a run that opened it just before must not believe
    it holds the lock (a third run would create and lock a new file): it retries."""
    from opt_deus_cli import output

    lock = tmp_path / ".out.opt-deus.lock"
    real_flock, raced = output.fcntl.flock, []

    def flock_after_the_holder_left(fd, op):
        if not raced:  # the previous holder unlinks the file between our open and our flock
            raced.append(True)
            lock.unlink()
        return real_flock(fd, op)

    monkeypatch.setattr(output.fcntl, "flock", flock_after_the_holder_left)
    (tmp_path / "model").mkdir()
    lock.write_text("")
    with output.OutputTransaction(tmp_path / "out", False, tmp_path / "model"):
        assert raced and lock.exists()
        with open(lock) as other:  # the file now at the path is the one locked
            with pytest.raises(BlockingIOError):
                real_flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert leftovers(tmp_path / "out") == []


def test_a_signal_during_commit_does_not_split_it(tmp_path, monkeypatch):
    """SIGTERM between the two renames of commit(): the swap completes (the old result is not
    left set aside with OUT_DIR missing), and the handlers are restored afterwards."""
    from opt_deus_cli import output

    out = tmp_path / "out"
    fake_result(out)
    (tmp_path / "model").mkdir()
    real_rename = os.rename

    def rename_then_signal(src, dst):
        real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    transaction = output.OutputTransaction(out, True, tmp_path / "model")
    with transaction as tmp:
        (tmp / "opt-deus-manifest.json").write_text('{"new": true}')
        monkeypatch.setattr(output.os, "rename", rename_then_signal)
        transaction.commit()
        monkeypatch.undo()
    assert json.loads((out / "opt-deus-manifest.json").read_text()) == {"new": True}
    assert leftovers(out) == ["out"] and signal.getsignal(signal.SIGTERM) is before


def test_concurrent_runs(big_model, tmp_path):
    """A second run on the same OUT_DIR while a first one writes: it fails on the lock, and the
    first one completes undisturbed (the same bytes as when it runs alone)."""
    out = tmp_path / "out"
    first = spawn(*big_run(big_model, out, "--json"))
    second = []
    when_writing({out: first}, lambda out, run: second.append(cli("upscale", *big_run(big_model, out), "--device", "cpu")))
    refused(second[0], 1, "another opt-deus run is writing")
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert leftovers(out) == ["out"]
    manifest = json.loads((out / "opt-deus-manifest.json").read_text())
    assert {f["name"]: f["sha256"] for f in manifest["output"]["files"]} == {
        name: digest for name, digest in snapshot(out).items() if name != "opt-deus-manifest.json"}
    # also determinism across processes (another hash seed for sets and dicts of strings)
    first_result = result_of(out)
    assert cli("upscale", *big_run(big_model, out), "--device", "cpu").exit_code == 0
    assert result_of(out) == first_result
    shutil.rmtree(out)


def test_a_killed_run_is_recovered(model_factory, tmp_path):
    """What SIGKILL or a power cut leaves: the temporary directory, the lock file, and, if it
    struck between the two renames of commit(), the old result set aside with OUT_DIR missing.
    The next run puts the old result back and clears the rest (and then, without --overwrite,
    refuses to replace it)."""
    out = tmp_path / "out"
    aside = Path(tempfile.mkdtemp(prefix=".out.old-", dir=tmp_path))  # named as commit() names them
    before = fake_result(aside / "previous")
    partial = Path(tempfile.mkdtemp(prefix=".out.partial-", dir=tmp_path))
    (partial / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.opt-deus.lock").write_text("")  # not held: its process is gone
    other = tmp_path / ".out.partial-x.partial-abcd1234"  # another output's temporary: not ours
    other.mkdir()
    refused(upscale(model_factory("llama"), out), 2, "already exists")
    assert snapshot(out) == before and leftovers(out) == sorted(["out", other.name])


# ---- determinism ---------------------------------------------------------------------------

def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("timings", "seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def result_of(out: Path) -> tuple[dict, dict]:
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "opt-deus-manifest.json"}
    return files, without_timings(json.loads((out / "opt-deus-manifest.json").read_text()))


OT_SINKHORN = "method: opt-deus\npositions: top\ncount: 2\nalignment: {solver: sinkhorn, epsilon: 0.1}\n"


@pytest.mark.parametrize("recipe", ["llama-pro", "solar", "average", "top-half", OT_SINKHORN])
def test_same_input_same_bytes(model_factory, tmp_path, recipe):
    if "\n" in recipe:
        recipe = write_recipe(tmp_path, recipe)
    base, out = model_factory("qwen3"), tmp_path / "out"
    assert upscale(base, out, recipe=recipe).exit_code == 0
    first = result_of(out)
    assert upscale(base, out, "--overwrite", recipe=recipe).exit_code == 0
    assert result_of(out) == first
