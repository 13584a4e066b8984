"""What every command shares: the Typer app, the two consoles (stdout for results, stderr for
progress, warnings and errors), and turning library errors into one line and an exit code."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import OptDeusError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make a pretrained language model deeper: OpT-DeUS (optimal-transport depth up-scaling) and its baselines.",
)
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # piped or captured: wide tables stay on one line each
    out.width = 160


def fail(error: OptDeusError) -> None:
    console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False)
    raise typer.Exit(error.exit_code)


def run(fn, *args, **kwargs):
    """Call into the library; turn its errors (and Ctrl-C) into one line and an exit code."""
    from ..output import Terminated

    try:
        return fn(*args, **kwargs)
    except OptDeusError as e:
        fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was left in the output location")
        raise typer.Exit(130)
    except Terminated:
        console.print("[bold red]terminated:[/] nothing was left in the output location")
        raise typer.Exit(143)
    except Exception as e:  # a bug of ours: one line, the traceback on request
        if os.environ.get("OPT_DEUS_DEBUG"):
            raise
        console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (set OPT_DEUS_DEBUG=1 for the traceback; please report it)")
        raise typer.Exit(1)


def version_callback(value: bool):
    if value:
        out.print(f"opt-deus {__version__}")
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. reference mode's) as one plain line, not a source excerpt."""
    console.print(f"[yellow]warning:[/] {message}", markup=True)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version.")):
    import warnings

    warnings.showwarning = _show_warning


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not enabled or not console.is_terminal,  # else rich adds a blank line after errors
    )
