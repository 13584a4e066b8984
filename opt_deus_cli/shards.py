"""Writing a checkpoint in Hugging Face's layout, shard by shard, in order (reading: checkpoint.py).

Writing: safetensors' own writer needs every tensor of a shard in memory at once (5 GB for a
default shard). Because every output shape and dtype is known from the plan before a byte is
written, the header of each shard is written first and tensors are then streamed into it in
order; the file format (8-byte little-endian header length, JSON header, raw data) is fixed by
the safetensors spec, and every written shard is re-opened with safetensors to check it.
Each shard's sha256 is computed on a hashing thread while the next bytes are written (hashing.py:
ranges of files on disk read back through memory maps, so memory does not grow with the model).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from .checkpoint import INDEX_FILE, SINGLE_FILE, TensorMeta
from .dtypes import dtype_code, value_bytes
from .errors import OptDeusError
from .hashing import Hashing, HashStream

if TYPE_CHECKING:
    import torch


def parse_size(text: str) -> int:
    """'5GB' or '5G' -> 5e9 bytes (Hugging Face's decimal units); '2GiB' or '2Gi' are binary;
    a bare number is bytes. Any case."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?(B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise OptDeusError(
            f"shard size {text!r} not understood; write e.g. 5GB (or 5G), 500MB (or 500M) or 2GiB", exit_code=2
        )
    prefix, binary = (m.group(2) or "").upper(), m.group(3) is not None
    scale = (1024 if binary else 1000) ** " KMGT".index(prefix or " ")
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise OptDeusError(f"shard size {text!r} must be positive", exit_code=2)
    return size


def plan_shards(entries: list[tuple[str, TensorMeta]], max_bytes: int) -> list[list[tuple[str, TensorMeta]]]:
    """Split tensors, kept in order, into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in entries:
        if shards[-1] and size + meta.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Streams tensors, in the planned order, into Hugging Face-named shards in `directory`.

    Call write(name, tensor) or copy_raw(...) for every planned tensor in order, then finish().
    Bytes go to the file at explicit offsets (pwrite, or copy_file_range from the source); each
    shard is a HashStream of the byte ranges written, hashed (and fsynced) on the `hashing` pool
    while the next shard is written. io_seconds: time spent writing and copying."""

    def __init__(
        self,
        directory: Path,
        entries: list[tuple[str, TensorMeta]],
        max_shard_bytes: int,
        hashing: Hashing | None = None,
    ):
        self.dir = Path(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self._order = [(i, name, meta) for i, shard in enumerate(self.shards) for name, meta in shard]
        self._pos = 0
        self._fd: int | None = None  # the open shard, written at self._offset
        self._read_fd = -1  # the same file read-only, for hashing it back
        self._offset = 0
        self._stream: HashStream | None = None
        self._shard = -1
        self._owns_hashing = hashing is None
        self.hashing = hashing if hashing is not None else Hashing()
        self._futures: dict[str, Future] = {}  # file -> future of (bytes, sha256)
        self.digests: dict[str, tuple[int, str]] = {}  # file -> (bytes, sha256), filled by finish()
        self.io_seconds = 0.0
        self.hash_wait_seconds = 0.0  # waiting, after the last byte, for the output's checksums

    def _open_shard(self, i: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, meta in self.shards[i]:
            header[name] = {
                "dtype": dtype_code(meta.dtype),
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
        path = self.dir / self.file_names[i]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._stream = self.hashing.stream(owned_fds=(self._read_fd,), fsync_fd=self._read_fd)
        self._offset, self._shard = 0, i
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _shard_open(self) -> tuple[int, HashStream]:
        """The open shard's file descriptor and checksum stream (_next opened them)."""
        assert self._fd is not None and self._stream is not None, "no shard is open"
        return self._fd, self._stream

    def _put(self, data) -> None:
        start = time.perf_counter()
        view, done = memoryview(data).cast("B"), 0
        fd, stream = self._shard_open()
        while done < len(view):
            done += os.pwrite(fd, view[done:], self._offset + done)
        stream.add(self._read_fd, self._offset, done)
        self._offset += done
        self.io_seconds += time.perf_counter() - start

    def _close_shard(self) -> None:
        fd, stream = self._shard_open()
        self._fd = None
        os.close(fd)
        self._futures[self.file_names[self._shard]] = stream.close()
        self._stream = None

    def _next(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Check that `name` is the next planned tensor and open its shard if needed."""
        shard, expected, meta = self._order[self._pos]
        if name != expected or dtype != meta.dtype or shape != meta.shape:
            raise RuntimeError(f"writer expected {expected} {meta}, got {name} {dtype} {shape}")
        if shard != self._shard:
            if self._fd is not None:
                self._close_shard()
            self._open_shard(shard)
        self._pos += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name, tensor.dtype, tuple(tensor.shape))
        # raw little-endian bytes of the tensor, without a copy when it is contiguous
        import torch

        self._put(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_constant(self, name: str, meta: TensorMeta, value: float) -> None:
        """A tensor whose every element is `value` (zero-init), written as bytes: no tensor is made."""
        self._next(name, meta.dtype, meta.shape)
        element = value_bytes(dtype_code(meta.dtype), value)
        chunk = element * max(1, min(meta.nbytes, 1 << 22) // len(element))  # up to 4 MiB at a time
        for start in range(0, meta.nbytes, len(chunk)):
            self._put(chunk[: meta.nbytes - start])

    def copy_raw(self, name: str, meta: TensorMeta, fd: int, offset: int, nbytes: int) -> None:
        """Append bytes of an input file unchanged: copied by the kernel, hashed from the source."""
        self._next(name, meta.dtype, meta.shape)
        start = time.perf_counter()
        out_fd, stream = self._shard_open()
        _copy_range(fd, offset, out_fd, self._offset, nbytes, name)
        stream.add(fd, offset, nbytes)  # the same bytes: hashed from the source's pages
        self._offset += nbytes
        self.io_seconds += time.perf_counter() - start

    def finish(self) -> dict[str, str]:
        """Close the last shard, wait for the checksums, check every shard reads back, write the
        index; returns weight_map."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        if self._fd is not None:
            self._close_shard()
        start = time.perf_counter()
        self.digests = {name: future.result() for name, future in self._futures.items()}  # re-raises a hashing error
        self.hash_wait_seconds = time.perf_counter() - start
        weight_map = {}
        for file_name, shard in zip(self.file_names, self.shards):
            with safe_open(str(self.dir / file_name), framework="pt") as f:
                if set(f.keys()) != {name for name, _ in shard}:
                    raise RuntimeError(f"{file_name} does not read back with the planned tensors")
            weight_map.update({name: file_name for name, _ in shard})
        if len(self.file_names) > 1:
            total = sum(meta.nbytes for _, _, meta in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_json(self.dir / INDEX_FILE, index)
        return weight_map

    def abort(self) -> None:
        """Stop: close the open file and end its hashing (finish() or not)."""
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            if self._stream is not None:
                stream, self._stream = self._stream, None
                stream.close()
        finally:
            if self._owns_hashing:
                self.hashing.shutdown(wait=True)


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int, name: str) -> None:
    """Bytes [src_offset, +nbytes) of one file to dst_offset of another: by the kernel
    (copy_file_range, as `cp` does), or through user space where the kernel cannot."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
            if n <= 0:
                raise OSError(f"copy of {name} stopped at {done} of {nbytes} bytes")
            done += n
        return
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY:
            raise
    while done < nbytes:  # another filesystem, an old kernel: 16 MiB at a time
        chunk = os.pread(src, min(1 << 24, nbytes - done), src_offset + done)
        if not chunk:
            raise OSError(f"copy of {name} stopped at {done} of {nbytes} bytes: the source ends early")
        written = 0
        while written < len(chunk):
            written += os.pwrite(dst, memoryview(chunk)[written:], dst_offset + done + written)
        done += len(chunk)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
