"""`opt-deus handoff`: a ready config, in another trainer's own dialect, that trains exactly the
new layers of an up-scaled model."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import PlainUsage, app, run


@app.command(cls=PlainUsage, short_help="A config that trains only the new layers in another trainer.")
def handoff(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="An opt-deus output (with its manifest)."),
    dialect: str = typer.Option(..., "--for", help="axolotl | llama-factory | peft | trainer"),
    transformers_major: int | None = typer.Option(
        None,
        "--transformers",
        help="Major version of the transformers the training will use (default: the installed one; "
        "mixtures of experts are named differently in 4 and 5).",
    ),
):
    """Print a ready config that trains only the new layers in axolotl, LLaMA-Factory, PEFT or Trainer.

    Each is written for that tool's own reading of a parameter selection (YAML for axolotl and
    LLaMA-Factory, Python for PEFT and a transformers Trainer script)."""
    from ..handoff import handoff as render_handoff

    text = run(render_handoff, out_dir, dialect, transformers_major)
    typer.echo(text, nl=False)  # verbatim: the text is a file for another tool
