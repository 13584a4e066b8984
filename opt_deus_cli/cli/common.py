"""What every command shares: the Typer app, the two consoles (stdout for results, stderr for
progress, warnings and errors), turning library errors (and click's own usage errors) into one
line and an exit code, and progress that suits where stderr goes (a bar on a terminal, plain
lines in a log)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..errors import OptDeusError, UsageError

if TYPE_CHECKING:
    from rich.progress import Progress

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # piped or captured: wide tables stay on one line each
    out.width = 160


class OneLineErrors(TyperGroup):
    """click's own usage errors (a missing argument, an unknown command or option, a bad value)
    as one plain `error: ...` line with click's exit code (2), like every error of ours, instead
    of click's usage block and boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `opt-deus`: the help is the answer
                console.print(e.format_message(), markup=False)
            else:
                ctx = getattr(e, "ctx", None)
                message = " ".join(e.format_message().split()).rstrip(".")
                hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
                console.print(f"[bold red]error:[/] {escape(message + hint)}")
            sys.exit(e.exit_code)
        except typer.Abort:
            console.print("[bold red]error:[/] aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class PlainUsage(TyperCommand):
    """The usage line as the README writes it: `DIR` for a required argument, `[MODEL]` for an
    optional one (typer writes a required one as `{DIR}`, which reads as a literal brace)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no boxes, and no `<bool>` after flags that take no value
    pretty_exceptions_enable=False,
    help="Make a pretrained language model deeper: OpT-DeUS (optimal-transport depth up-scaling) and its baselines.",
)


def fail(error: OptDeusError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}")  # escaped: messages quote [o_proj, ...]
    raise typer.Exit(error.exit_code)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def run(fn, *args, **kwargs):
    """Call into the library; turn its errors (and Ctrl-C) into one line and an exit code."""
    from ..output import Terminated

    try:
        return fn(*args, **kwargs)
    except OptDeusError as e:
        fail(e)
    except KeyboardInterrupt as e:
        console.print(f"[bold red]interrupted:[/] {escape(_untouched(e))}")
        raise typer.Exit(130) from e
    except Terminated as e:
        console.print(f"[bold red]terminated:[/] {escape(_untouched(e))}")
        raise typer.Exit(143) from e
    except Exception as e:  # a bug of ours: one line, the traceback on request
        if os.environ.get("OPT_DEUS_DEBUG"):
            raise
        console.print(
            f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} "
            "(set OPT_DEUS_DEBUG=1 for the traceback; please report it)"
        )
        raise typer.Exit(1) from e


def _untouched(interrupt: BaseException) -> str:
    """What an interrupted run left: the output transaction says so (output.OutputTransaction)."""
    return getattr(interrupt, "output_state", None) or "stopped before writing anything"


def writable_file(path: Path | None, option: str) -> None:
    """Refuse, before any work, a file option that cannot be written (a missing directory, a
    directory in its place, no permission)."""
    if path is None:
        return
    parent = path.absolute().parent
    if path.is_dir():
        fail(UsageError(f"{option} {path} is a directory; give a file name"))
    if not parent.is_dir():
        fail(UsageError(f"{option} {path}: directory {parent} does not exist; create it or choose another place"))
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(UsageError(f"{option} {path}: cannot write to {parent} (permission denied)"))


def version_callback(value: bool):
    if value:
        out.print(f"opt-deus {__version__}")
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. reference mode's) as one plain line, not a source excerpt."""
    warn(str(message))


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
):
    import warnings

    warnings.showwarning = _show_warning


class PlainProgress:
    """Progress for a log or a job scheduler (stderr is not a terminal): one plain line per step
    (a new description, e.g. each layer) or every LOG_EVERY seconds, on stderr, with the time left
    once a counted phase has made progress:
        [5/12 3s eta 4s] layer 4 (new: opt-deus of [3, 4])
    The same calls as rich's Progress (add_task, update)."""

    LOG_EVERY = 10.0  # seconds between lines while the description stays the same

    def __init__(self):
        self._tasks: dict[int, dict] = {}
        self._start = time.monotonic()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        task = self._next = getattr(self, "_next", -1) + 1
        self._tasks[task] = {
            "description": description,
            "completed": 0,
            "total": total,
            "said": None,
            "at": 0.0,
            "since": time.monotonic(),
        }
        return task

    def remove_task(self, task: int) -> None:
        self._tasks.pop(task, None)

    def update(
        self,
        task: int,
        description: str | None = None,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        **_,
    ) -> None:
        t = self._tasks[task]
        if (description is not None and description != t["description"]) or completed == 0:
            t["since"] = time.monotonic()  # a new phase: its time left counts from here
        for key, value in (("description", description), ("completed", completed), ("total", total)):
            if value is not None:
                t[key] = value
        if advance:
            t["completed"] += advance
        now = time.monotonic()
        if t["description"] != t["said"] or now - t["at"] >= self.LOG_EVERY:
            t["said"], t["at"] = t["description"], now
            count = f"{int(t['completed'])}/{int(t['total'])} " if t["total"] else ""
            done, total = t["completed"], t["total"]
            eta = f" eta {(now - t['since']) / done * (total - done):.0f}s" if total and 0 < done < total else ""
            console.print(f"[{count}{now - self._start:.0f}s{eta}] {t['description']}", markup=False)


def progress_bar(enabled: bool) -> Progress | PlainProgress:
    """A rich bar on a terminal; plain lines when stderr goes to a file or a pipe."""
    from rich.progress import (  # work only
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if enabled and not console.is_terminal:
        return PlainProgress()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )
