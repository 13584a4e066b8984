"""The output directory as a transaction: everything is written into a hidden temporary
directory beside OUT_DIR and renamed into place only when complete; on any failure (error,
Ctrl-C, SIGTERM, disk full) the temporary directory is removed and an existing OUT_DIR is left
as it was. A lock file beside OUT_DIR keeps two runs from writing the same place at once, and
the next run clears what a killed one (SIGKILL, power loss) left behind. Also here: the one copy of
a model directory's side files (tokenizer, generation config, ...) into an output."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import WEIGHT_SUFFIXES
from .errors import OptDeusError, UsageError
from .manifest import MANIFEST_FILE


def current_umask() -> int:
    """The process's umask (read without changing it where Linux tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but nothing else runs yet)
    os.umask(mask)
    return mask


# what belongs to a model besides its weights and config (matched case-insensitively): tokenizer,
# generation settings, chat template, licence and notice files. Anything else in a model directory
# (a local base's own notes, data, training records) describes that model, not the output.
MODEL_FILE_GLOBS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "generation_config.json",
    "chat_template*",
    "license*",
    "licence*",
    "notice*",
    "copying*",
    "use_policy*",
)


def belongs_to_model(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), glob) for glob in MODEL_FILE_GLOBS)


def check_extra_globs(files: list[Path], extra: tuple[str, ...] | list[str], model_dir: Path | str) -> None:
    """--copy-extra GLOB that names no file of the model directory does nothing: refuse it."""
    for glob in extra:
        if not any(fnmatch.fnmatchcase(path.name, glob) for path in files):
            names = (
                ", ".join(
                    sorted(
                        p.name for p in files if not belongs_to_model(p.name) and not p.name.endswith(WEIGHT_SUFFIXES)
                    )
                )
                or "none"
            )
            raise UsageError(
                f"--copy-extra {glob} matches no file of {model_dir} (files not copied by default: {names})"
            )


def copy_side_files(files: list[Path], out: Path, skipped: set[str], extra: tuple[str, ...] | list[str] = ()) -> None:
    """Copy the files of a model directory that belong to the model but are not weights (tokenizer,
    generation config, chat template, licence, ...; MODEL_FILE_GLOBS) and those the `extra` globs
    name (--copy-extra), into `out`; never weights nor those named in `skipped` (the caller writes its own)."""
    for path in files:
        if path.name in skipped or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        if belongs_to_model(path.name) or any(fnmatch.fnmatchcase(path.name, glob) for glob in extra):
            shutil.copy2(path, out / path.name)


def umask_modes(directory: Path) -> None:
    """Give every file in `directory` the mode open() would (0666 less the umask): writers such as
    safetensors' make theirs 0600, and a copy keeps its source's mode."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).iterdir():
        if path.is_file():
            os.chmod(path, mode)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def _signals_held():
    """Run a block that must not be cut in half (the renames of a commit, cleanup) with SIGINT
    and SIGTERM noted instead of raised. A signal that arrives meanwhile is dropped: the caller
    is finishing anyway. Handlers, not a signal mask: Python runs handlers in the main thread
    whichever thread the kernel delivers to, so masking the main thread alone would not do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: None)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class OutputTransaction:
    def __init__(self, out_dir: Path | str, overwrite: bool, model_dir: Path | str):
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.model_dir = Path(model_dir).resolve()
        self.tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.out.parent / f".{self.out.name}.opt-deus.lock"
        self._old_handlers: dict = {}

    def _prefix(self, kind: str) -> str:
        return f".{self.out.name}.{kind}-"

    def check(self) -> None:
        """Refusals that need no writing: call before any expensive work (and again under the lock)."""
        out = self.out.resolve()
        if out == self.model_dir or out.is_relative_to(self.model_dir):
            raise UsageError(f"output {self.out} is inside the model directory {self.model_dir}; choose another place")
        if self.model_dir.is_relative_to(out):
            raise UsageError(
                f"output {self.out} contains the model directory {self.model_dir}; replacing it would delete the model"
            )
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"output {self.out} exists and is not a directory")
        if self.out.exists():
            if not self.overwrite:
                raise UsageError(
                    f"output {self.out} already exists; pass --overwrite to replace it (it is replaced only by a complete new result)"
                )
            # --overwrite deletes the old directory: only ever one of ours (or an empty one)
            if not (self.out / MANIFEST_FILE).is_file() and any(self.out.iterdir()):
                raise UsageError(
                    f"output {self.out} is not an opt-deus output (no {MANIFEST_FILE}); refusing to replace it: remove it yourself or choose another output"
                )
        parent = self.out.parent
        if not parent.is_dir():
            raise UsageError(f"parent directory {parent} of the output does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {parent} (permission denied); choose an output you can write")

    def __enter__(self) -> Path:
        try:
            self._catch_signals()
            self._acquire_lock()
            self._recover()
            self.check()  # again: another run may have finished while we waited for the lock
            self.tmp = Path(tempfile.mkdtemp(prefix=self._prefix("partial"), dir=self.out.parent))
            # mkdtemp makes it 0700, which the rename would keep: give it what mkdir gives
            os.chmod(self.tmp, 0o777 & ~current_umask())
        except BaseException as e:
            self._cleanup()
            if isinstance(e, OSError):
                usage = isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.ENOENT)
                raise OptDeusError(
                    f"cannot write beside {self.out}: {e.strerror or e}; choose an output you can write",
                    exit_code=2 if usage else 1,
                ) from e
            raise
        return self.tmp

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_terminated)
        # past a file-size limit, fail the write (OSError EFBIG) instead of being killed
        self._old_handlers[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _acquire_lock(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OptDeusError(
                    f"another opt-deus run is writing {self.out} (lock {self._lock_path}); wait for it or choose another output"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # A finishing run unlinks the lock file; if it did so between our open and our
            # flock, we hold a lock on a file nobody else will open: retry on the current one.
            try:
                current = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._lock_fd = fd
                return
            os.close(fd)

    def _recover(self) -> None:
        """Under the lock, what a killed run left is stale: its temporary directory goes, and
        if it died between the two renames of commit(), the set-aside old result is put back."""
        for entry in sorted(self.out.parent.iterdir()):
            if self._ours(entry, "old"):
                previous = entry / "previous"
                if previous.is_dir() and not self.out.exists():
                    os.rename(previous, self.out)
                shutil.rmtree(entry, ignore_errors=True)
            elif self._ours(entry, "partial"):
                shutil.rmtree(entry, ignore_errors=True)

    def _ours(self, entry: Path, kind: str) -> bool:
        """A directory made by mkdtemp for this OUT_DIR (prefix + 8 random characters); not, say,
        the temporary directory of another output named `OUT.partial-x`."""
        prefix = self._prefix(kind)
        return (
            entry.name.startswith(prefix)
            and re.fullmatch(r"[a-z0-9_]{8}", entry.name[len(prefix) :]) is not None
            and entry.is_dir()
        )

    def commit(self) -> None:
        """Swap the complete result into place; the old OUT_DIR is removed only afterwards."""
        with _signals_held():  # an interrupt here would leave neither the old nor the new result
            old = None
            if self.out.exists():
                old = Path(tempfile.mkdtemp(prefix=self._prefix("old"), dir=self.out.parent))
                os.rename(self.out, old / "previous")
            try:
                os.rename(self.tmp, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old / "previous", self.out)
                raise
            self.tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _state_after_interrupt(self, committed: bool) -> str:
        if committed:
            return f"the new output {self.out} was already complete"
        if self.out.exists():
            return f"nothing was written; the previous output {self.out} is intact"
        return f"nothing was written; {self.out} was not created"

    def _cleanup(self) -> None:
        with _signals_held():  # a second Ctrl-C must not stop the cleanup half-way
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            if self._lock_fd is not None:
                self._lock_path.unlink(missing_ok=True)  # while still holding it: see _acquire_lock
                os.close(self._lock_fd)  # closing releases the lock
                self._lock_fd = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        committed = self.tmp is None
        self._cleanup()
        if isinstance(exc, (KeyboardInterrupt, Terminated)):  # what the CLI says about it (cli.common.run)
            exc.output_state = self._state_after_interrupt(committed)
        if isinstance(exc, OSError):
            raise OptDeusError(
                f"writing {self.out} failed: {exc.strerror or exc}; the output location was left as it was"
            ) from exc
