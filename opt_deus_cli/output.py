"""The output directory as a transaction: everything is written into a hidden temporary
directory beside OUT_DIR and renamed into place only when complete; on any failure (error,
Ctrl-C, SIGTERM, disk full) the temporary directory is removed and an existing OUT_DIR is left
as it was. A lock file beside OUT_DIR keeps two runs from writing the same place at once."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import OptDeusError, UsageError


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


class OutputTransaction:
    def __init__(self, out_dir: Path | str, overwrite: bool, model_dir: Path | str):
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.model_dir = Path(model_dir).resolve()
        self.tmp: Path | None = None
        self._lock = None
        self._old_sigterm = None

    def check(self) -> None:
        """Refusals that need no writing: call before any expensive work."""
        out = self.out.resolve()
        if out == self.model_dir or out.is_relative_to(self.model_dir):
            raise UsageError(f"output {self.out} is inside the model directory {self.model_dir}; choose another place")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"output {self.out} exists and is not a directory")
        if self.out.exists() and not self.overwrite:
            raise UsageError(f"output {self.out} already exists; pass --overwrite to replace it (it is replaced only by a complete new result)")
        parent = self.out.parent
        if not parent.is_dir():
            raise UsageError(f"parent directory {parent} of the output does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {parent} (permission denied); choose an output you can write")

    def __enter__(self) -> Path:
        self.check()
        lock_path = self.out.parent / f".{self.out.name}.opt-deus.lock"
        self._lock = open(lock_path, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise OptDeusError(f"another opt-deus run is writing {self.out} (lock {lock_path}); wait for it or choose another output")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        try:
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
            # past a file-size limit, fail the write (OSError EFBIG) instead of being killed
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread: no signal handling
            self._old_sigterm = None
        return self.tmp

    def commit(self) -> None:
        """Swap the complete result into place; the old OUT_DIR is removed only afterwards."""
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "previous")
        os.rename(self.tmp, self.out)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if self._lock is not None:
            lock_path = Path(self._lock.name)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            lock_path.unlink(missing_ok=True)
        if exc_type is OSError or (exc is not None and isinstance(exc, OSError)):
            raise OptDeusError(f"writing {self.out} failed: {exc.strerror or exc}; nothing was left in place") from exc
