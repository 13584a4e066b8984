"""`opt-deus verify`: does the deeper checkpoint do what its manifest promises?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import app, console, out, run

@app.command()
def verify(
    base_dir: Path = typer.Argument(..., help="The base model directory."),
    out_dir: Path = typer.Argument(..., help="The up-scaled model directory (with its manifest)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Also compute both models' perplexity on this text file."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check the result: files match the manifest, both models load and run, and logits agree
    where the recipe is function-preserving. Exit 0 when the result is what the manifest promises."""
    from ..devices import resolve_device
    from ..verify import verify as run_verify

    dev = run(resolve_device, device)
    report = run(run_verify, base_dir, out_dir, dev, text)
    if as_json:
        out.print_json(data=report)
    else:
        out.print(f"base {report['base_layers']} layers, output {report['output_layers']} layers; "
                  f"function-preserving recipe: {'yes' if report['function_preserving'] else 'no'}")
        out.print(f"logits on {report['tokens'][0]}x{report['tokens'][1]} fixed token ids: "
                  f"max |diff| {report['max_abs_logit_diff']:.3g}, mean |diff| {report['mean_abs_logit_diff']:.3g} "
                  f"(tolerance {report['tolerance']:.3g})")
        if "perplexity" in report:
            ppl = report["perplexity"]
            out.print(f"perplexity on {text} ({report['text_tokens']} tokens): base {ppl['base']:.3f}, output {ppl['output']:.3f}")
    if report["ok"]:
        if not as_json:
            out.print("ok: the result is what the manifest promises")
    else:
        console.print(f"[bold red]failed:[/] {'; '.join(report['problems'])}")
        raise typer.Exit(1)
