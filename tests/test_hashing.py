"""Checksums at disk speed: output shards hashed from byte ranges while the next ones are written,
on a pool of one thread per core; a Hub cache's LFS blob names reused as the base's sha256."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from conftest import make_hub_cache
from opt_deus_cli import hashing
from opt_deus_cli.checkpoint import TensorMeta
from opt_deus_cli.hashing import Hashing, hub_blob_sha256, sha256_file
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.shards import ShardWriter
from opt_deus_cli.upscale import Options, upscale


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_mixed(directory: Path, source: Path, pool: Hashing | None) -> ShardWriter:
    """Shards of written tensors and of byte ranges copied from `source` (a file of 4096 bytes)."""
    entries = [(f"t{i}", TensorMeta(torch.float32, (256,))) for i in range(6)]
    writer = ShardWriter(directory, entries, max_shard_bytes=2100, hashing=pool)
    fd = os.open(source, os.O_RDONLY)
    try:
        for i, (name, meta) in enumerate(entries):
            if i % 2:
                writer.copy_raw(name, meta, fd, 1024 * (i // 2), meta.nbytes)
            else:
                writer.write(name, torch.full((256,), float(i)))
        writer.finish()
    finally:
        writer.abort()
        os.close(fd)
    return writer


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_shard_checksums_are_the_files_sha256(tmp_path, workers):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    out.mkdir()
    pool = Hashing(workers)
    try:
        writer = write_mixed(out, source, pool)
    finally:
        pool.shutdown()
    assert len(writer.file_names) == 3 and writer.digests.keys() == set(writer.file_names)
    for name, (size, digest) in writer.digests.items():
        assert size == (out / name).stat().st_size and digest == sha256(out / name)
    assert pool.cpu_seconds > 0


def test_copies_fall_back_to_user_space_where_the_kernel_cannot(tmp_path, monkeypatch):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(4096))
    (tmp_path / "kernel").mkdir()
    (tmp_path / "user").mkdir()
    kernel = write_mixed(tmp_path / "kernel", source, None)

    def no_kernel_copy(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    user = write_mixed(tmp_path / "user", source, None)
    assert kernel.digests == user.digests
    for name in kernel.file_names:
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "user" / name).read_bytes()


def test_hub_blob_names(tmp_path):
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    data = b"weights"
    lfs = repo / "blobs" / hashlib.sha256(data).hexdigest()
    lfs.write_bytes(data)
    git = repo / "blobs" / ("1" * 40)  # a small file stored in git: named by its git sha1
    git.write_bytes(b"{}")
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(lfs, snapshot))
    (snapshot / "config.json").symlink_to(os.path.relpath(git, snapshot))
    (snapshot / "plain.txt").write_text("x")
    elsewhere = tmp_path / ("2" * 64)
    elsewhere.write_bytes(b"?")
    (snapshot / "stray").symlink_to(elsewhere)
    assert hub_blob_sha256(snapshot / "model.safetensors") == hashlib.sha256(data).hexdigest()
    for name in ("config.json", "plain.txt", "stray"):
        assert hub_blob_sha256(snapshot / name) is None, name
    pool = Hashing()
    try:
        assert pool.file(snapshot / "model.safetensors").result() == (len(data), hashlib.sha256(data).hexdigest())
        assert pool.file(snapshot / "config.json").result() == (2, sha256(git))
        assert pool.reused == 1
    finally:
        pool.shutdown()


def test_a_hub_snapshot_is_not_hashed_again(model_factory, tmp_path, monkeypatch):
    snapshot = make_hub_cache(tmp_path / "hub", "org/tiny", model_factory("llama", layers=4))
    hashed = []
    original = hashing.sha256_file

    def spy(path):
        hashed.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(hashing, "sha256_file", spy)
    recipe = parse_recipe({"method": "copy", "positions": "top", "count": 1, "zero_init": ["o_proj", "down_proj"]})
    manifest = upscale(snapshot, recipe, tmp_path / "out", Options(device="cpu", shard_size="60KB"))
    weights = [f for f in manifest.base.files if f.name.endswith(".safetensors")]
    assert len(weights) > 1 and not any(name.endswith(".safetensors") for name in hashed)
    assert "config.json" in hashed  # a git blob, named by its sha1: hashed
    for entry in manifest.base.files:
        assert entry.sha256 == sha256_file(snapshot / entry.name), entry.name
    for entry in manifest.output.files:
        assert entry.sha256 == sha256(tmp_path / "out" / entry.name), entry.name
    assert manifest.timings["checksums_cpu"] > 0
