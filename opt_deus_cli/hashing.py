"""SHA-256 of the files the manifest lists: the base's and the output's, on every core.

One SHA-256 stream is sequential, but different files are independent: every file (a base file,
or an output shard as it is written) is one task on a pool of one thread per usable core, and
hashlib releases the GIL, so the checksums of a run cost about (bytes in + bytes out) / (cores x
~2 GB/s) of wall time, overlapping the copy. Bytes are read back through read-only memory maps of
HASH_CHUNK at a time (no copy to user space, no growth of memory), and an output shard is fed as
byte ranges of files already written, never as data held in memory.

A base file in a Hugging Face cache needs no hashing: snapshots/<rev>/<file> links to
blobs/<name>, and for files stored in LFS (the weights) that name is the file's sha256.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

HASH_CHUNK = 1 << 26  # 64 MiB of a file mapped at a time
Digest = tuple[int, str]  # (bytes, sha256 hex)


def hash_range(hasher, fd: int, offset: int, nbytes: int) -> None:
    """Feed bytes [offset, offset + nbytes) of a file to `hasher` through read-only maps of
    HASH_CHUNK bytes, each unmapped at once: no copy to user space, and no growth of memory."""
    end = offset + nbytes
    while offset < end:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps start page-aligned
        length = min(end, start + HASH_CHUNK) - start
        with mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ, offset=start
        ) as mapped:
            with memoryview(mapped) as view:
                hasher.update(view[offset - start : length])
        offset = start + length


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    size = Path(path).stat().st_size
    if size:
        fd = os.open(path, os.O_RDONLY)
        try:
            hash_range(hasher, fd, 0, size)
        finally:
            os.close(fd)
    return hasher.hexdigest()


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of `path` when it is a Hugging Face cache link to an LFS blob, which the cache
    names by its sha256 (snapshots/<rev>/<file> -> ../../blobs/<64 hex>); None otherwise (a plain
    file, or a small git-stored file, whose blob is named by its 40-hex git sha1)."""
    path = Path(path)
    if not path.is_symlink():
        return None
    target = path.resolve()
    blobs = target.parent
    if blobs.name != "blobs" or not (blobs.parent / "snapshots").is_dir():
        return None
    if not path.parent.resolve().is_relative_to(blobs.parent / "snapshots"):
        return None
    return target.name if re.fullmatch(r"[0-9a-f]{64}", target.name) else None


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class HashStream:
    """The sha256 of a file being written, fed in order as byte ranges (fd, offset, nbytes) of
    files on disk (the output file itself, read back, or a source whose bytes were copied)."""

    def __init__(self, pool: Hashing, owned_fds: tuple[int, ...], fsync_fd: int | None):
        self._ranges: queue.SimpleQueue = queue.SimpleQueue()
        self._owned, self._fsync = owned_fds, fsync_fd
        self.future: Future = pool._submit(self._run)

    def add(self, fd: int, offset: int, nbytes: int) -> None:
        self._ranges.put((fd, offset, nbytes))

    def close(self) -> Future:
        """No more ranges; the future gives (bytes, sha256) once all are hashed (and the file fsynced)."""
        self._ranges.put(None)
        return self.future

    def _run(self) -> Digest:
        hasher, size = hashlib.sha256(), 0
        try:
            while (item := self._ranges.get()) is not None:
                hash_range(hasher, *item)
                size += item[2]
            if self._fsync is not None:  # durable before the output is renamed into place
                os.fsync(self._fsync)
        finally:
            for fd in self._owned:
                os.close(fd)
        return size, hasher.hexdigest()


class Hashing:
    """A pool of hashing threads, one per usable core, for whole files and files being written.
    cpu_seconds: the thread CPU time spent hashing (and fsyncing) so far."""

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or usable_cores(), thread_name_prefix="sha256")
        self.cpu_seconds = 0.0
        self.reused = 0  # files whose checksum came from a Hub cache's blob name

    def _submit(self, fn) -> Future:
        def timed():
            start = time.thread_time()
            try:
                return fn()
            finally:
                self.cpu_seconds += time.thread_time() - start  # one += per task: the GIL makes it safe enough

        return self._pool.submit(timed)

    def file(self, path: Path) -> Future:
        """(bytes, sha256) of a whole file: its Hub blob name when it has one, else hashed."""
        path = Path(path)
        known = hub_blob_sha256(path)
        if known is not None:
            done: Future = Future()
            done.set_result((path.stat().st_size, known))
            self.reused += 1
            return done
        return self._submit(lambda: (path.stat().st_size, sha256_file(path)))

    def stream(self, owned_fds: tuple[int, ...] = (), fsync_fd: int | None = None) -> HashStream:
        """A HashStream; owned_fds are closed once it is done, fsync_fd is fsynced before."""
        return HashStream(self, owned_fds, fsync_fd)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
