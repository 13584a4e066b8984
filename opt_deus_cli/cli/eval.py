"""`opt-deus eval`: did the deeper model pay off? Models side by side on lm-evaluation-harness
tasks (the paper's suite, or local YAML tasks) and on local texts; the first model is the
reference."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..errors import UsageError
from ..figures import image_format
from .common import PlainUsage, app, console, fail, out, progress_bar, run, writable_file


@app.command(
    name="eval",
    cls=PlainUsage,
    short_help="Score models side by side with lm-evaluation-harness (the paper's suite, local tasks, texts).",
)
def eval_command(
    models: list[str] = typer.Argument(
        ...,
        metavar="MODEL...",
        help="Models in table order, the first the reference: a "
        "directory (an opt-deus output, a training checkpoint-N) or a Hub repo id.",
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="paper (the paper's zero-shot suite and wikitext) or lm-eval task names, comma-separated."
    ),
    include_path: Path | None = typer.Option(None, "--include-path", help="A directory of local lm-eval task YAMLs."),
    text: list[Path] | None = typer.Option(
        None, "--text", help="A local text file: token and word perplexity (repeat for several)."
    ),
    limit: float | None = typer.Option(
        None, "--limit", help="At most N documents per task (a fraction < 1: that share); for quick looks."
    ),
    num_fewshot: int | None = typer.Option(
        None, "--num-fewshot", help="Few-shot examples (default: each task's own, 0 where it sets none)."
    ),
    batch_size: str = typer.Option(
        "1", "--batch-size", help="Requests per forward pass: a number, or auto (lm-eval finds the largest that fits)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("keep", help="keep (the stored dtype) | float32 | bfloat16 | float16"),
    out_file: Path | None = typer.Option(
        None, "--out", help="Write the whole results (models' sha256, lm-eval and task versions) as JSON."
    ),
    png: Path | None = typer.Option(
        None, "--png", help="Draw score against training step, a line per run (needs checkpoint directories)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Score every MODEL on lm-evaluation-harness tasks (lm_eval.simple_evaluate with its hf model) and
    on --text files (the perplexity `verify --text` computes), then print a table: a row per model, a
    column per task and text, the average of the accuracies, each with its difference from the first
    MODEL. Inputs are never modified; --out and --png appear only complete."""
    from ..evaluation import evaluate
    from ..evaluation.models import is_checkpoint
    from ..evaluation.table import save_curve, table_cells

    writable_file(out_file, "--out")
    writable_file(png, "--png")
    if png is not None:
        run(image_format, png)  # before any work: matplotlib is there and writes the format the name says
    if png is not None and not any(is_checkpoint(m) for m in models):
        fail(
            UsageError(
                "--png draws score against training step: give training checkpoint directories "
                "(checkpoint-N, from save_strategy) among the MODELs"
            )
        )
    size: int | str = int(batch_size) if batch_size.isdigit() else batch_size
    count = int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit
    with progress_bar(enabled=not as_json) as bar:
        task = bar.add_task("evaluating", total=len(models))

        def on_progress(done: int, total: int, description: str) -> None:
            bar.update(task, description=description, completed=done, total=total)

        results = run(
            evaluate,
            models,
            tasks,
            include_path,
            tuple(text or ()),
            count,
            num_fewshot,
            size,
            device,
            dtype,
            on_progress,
        )
    if png is not None:
        run(save_curve, png, results)
    if out_file is not None:
        run(_write_json, out_file, results)
    if as_json:
        out.print_json(data=results)
        return
    _print_table(results, table_cells)
    for path in (png, out_file):
        if path is not None:
            console.print(f"wrote {escape(str(path))}")


def _write_json(path: Path, results: dict) -> None:
    import json

    from ..inspect import write_file

    write_file(path, lambda fh: fh.write((json.dumps(results, indent=2, allow_nan=False) + "\n").encode()))


def _print_table(results: dict, table_cells) -> None:
    from rich.table import Table

    table = results["table"]
    header, rows = table_cells(table)
    grid = Table(show_edge=False, header_style="bold")
    for i, name in enumerate(header):
        grid.add_column(escape(name), justify="left" if i == 0 else "right")
    for row in rows:
        grid.add_row(*(escape(cell) for cell in row))
    out.print(grid)
    settings = results["settings"]
    shots = settings["num_fewshot"]
    said = [f"lm-eval {results['versions']['lm_eval']}"]
    if settings["tasks"]:
        said.append(
            ("paper suite, " if results["suite"] else "")
            + ("each task's default shots" if shots is None else f"{shots}-shot")
            + (f", limit {settings['limit']}" if settings["limit"] else "")
        )
    if table["average_of"]:
        said.append(f"average of {', '.join(table['average_of'])}")
    if len(rows) > 1:
        said.append(f"(+/-) against {table['reference']}")
    out.print(escape("; ".join(said)))
    for note in table["notes"]:
        out.print(f"note: {escape(note)}")
