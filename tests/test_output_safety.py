"""The output location through the real command line (output.py): bad locations are refused and
an existing result is kept; a run that fails, is interrupted, races another or is killed never
leaves a half-written result or loses an old one.

Split from test_reliability.py (issue 19); the command-line helpers are in conftest.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import (
    MANIFEST,
    OPT_DEUS,
    cli,
    fake_result,
    leftovers,
    messages,
    refused,
    result_of,
    snapshot,
    upscale,
)

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
    written = [
        f for f in (tmp_path / "out").iterdir() if f.suffix == ".safetensors" or f.name in ("config.json", MANIFEST)
    ]
    for file in written:  # the files opt-deus writes, as open() makes them (side files keep the base's mode)
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


# ---- faults during a run (real processes) --------------------------------------------------


def spawn(*args, limit_file_size: int | None = None) -> subprocess.Popen:
    command = [OPT_DEUS, "upscale", *map(str, args), "--device", "cpu"]
    if limit_file_size is not None:  # set in a launcher, not preexec_fn (unsafe with threads)
        launcher = (
            "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "os.execv(sys.argv[2], sys.argv[2:])"
        )
        command = [sys.executable, "-c", launcher, str(limit_file_size), *command]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


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
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    (path / "config.json").write_text(json.dumps(config))
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.zeros(vocab, hidden, dtype=bf16),
        "model.norm.weight": torch.ones(hidden, dtype=bf16),
        "lm_head.weight": torch.zeros(vocab, hidden, dtype=bf16),
    }
    shapes = {
        "self_attn.q_proj": (512, hidden),
        "self_attn.k_proj": (256, hidden),
        "self_attn.v_proj": (256, hidden),
        "self_attn.o_proj": (hidden, 512),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
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
    when_writing(
        {out: first}, lambda out, run: second.append(cli("upscale", *big_run(big_model, out), "--device", "cpu"))
    )
    refused(second[0], 1, "another opt-deus run is writing")
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert leftovers(out) == ["out"]
    manifest = json.loads((out / "opt-deus-manifest.json").read_text())
    assert {f["name"]: f["sha256"] for f in manifest["output"]["files"]} == {
        name: digest for name, digest in snapshot(out).items() if name != "opt-deus-manifest.json"
    }
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
