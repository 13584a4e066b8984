"""`opt-deus verify`: does the deeper checkpoint do what its manifest promises?
Exit 0: yes; 1: checked and failed; 2: could not check (bad arguments), as for every command."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import PlainUsage, app, console, out, progress_bar, run, warn


@app.command(cls=PlainUsage, short_help="Check a result against its manifest: files, loading, logits, perplexity.")
def verify(
    base_dir: str = typer.Argument(
        ..., metavar="BASE", help="The base model: its directory, or its Hub repo id (the commit the manifest records)."
    ),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="The up-scaled model directory (with its manifest)."),
    text: Path | None = typer.Option(None, "--text", help="Also compute both models' perplexity on this text file."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check the result: the output's and the base's files match the sha256s in the manifest, both
    models load and run, and logits agree where the recipe is function-preserving. Exit 0 when the
    result is what the manifest promises, 1 when a check failed, 2 when the arguments are wrong."""
    from ..devices import check_device, resolve_device
    from ..verify import check_arguments
    from ..verify import verify as run_verify

    run(check_device, device)  # the arguments are checked before torch is imported
    base = run(_base_path, base_dir, out_dir)
    run(check_arguments, base, out_dir, text)
    dev = run(resolve_device, device)
    with progress_bar(enabled=not as_json) as bar:
        task = bar.add_task("verifying", total=None)

        def on_progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        report = run(run_verify, base, out_dir, dev, text, on_progress)
    if as_json:
        out.print_json(data=report)
    else:
        _print_report(report, text)
    if not report["ok"]:
        console.print(f"[bold red]failed:[/] {'; '.join(report['problems'])}", markup=True)
        raise typer.Exit(1)


def _base_path(spec: str, out_dir: Path) -> Path:
    """A directory as given, or a Hub repo id at the commit the output's manifest records."""
    from ..hub import resolve_model
    from ..manifest import read_manifest

    manifest = read_manifest(out_dir) if Path(out_dir).is_dir() else None
    recorded = manifest.base.revision if manifest is not None and manifest.base.repo_id == spec else None
    return resolve_model(spec, None if Path(spec).exists() else recorded).path


def _print_report(report: dict, text: Path | None) -> None:
    for warning in report.get("warnings", []):
        warn(warning)
    preserving = report["function_preserving"]
    files = report["files_checked"]
    out.print(
        f"recipe {report['method']}, function-preserving: {'yes' if preserving else 'no'}; "
        f"compared {files['output']} output and {files['base']} base files with the sha256s in the manifest"
    )
    if "max_abs_logit_diff" not in report:
        return  # a model did not load: the problems say which
    out.print(f"base {report['base_layers']} layers, output {report['output_layers']} layers; both loaded and ran")
    window = f" (longer than the sliding window, {report['sliding_window']})" if report.get("sliding_window") else ""
    measured = (
        f"logits of both models on {report['tokens'][0]}x{report['tokens'][1]} fixed token ids{window}: "
        f"max |diff| {report['max_abs_logit_diff']:.3g}, mean |diff| {report['mean_abs_logit_diff']:.3g}"
    )
    if preserving:
        out.print(
            f"{measured} (tolerance {report['tolerance']:.3g}): the recipe is function-preserving, so they must agree"
        )
    elif "training_steps" in report:
        out.print(
            f"{measured}: how far the up-scaling and the training after it ({report['training_steps']} steps, "
            "see the manifest's training record) moved the output, a measurement, not a check: a trained "
            "model is not meant to compute what the base does"
        )
    else:
        out.print(
            f"{measured}: how far the up-scaling moved the output, a measurement, not a check: this "
            "recipe is not function-preserving (its new layers write to the residual stream, or base "
            "layers were dropped or repeated), so the output is not meant to compute what the base does"
        )
    if "perplexity" in report:
        ppl = report["perplexity"]
        words = report["word_perplexity"]
        out.print(
            f"perplexity on {text} ({report['text_tokens']} tokens): base {ppl['base']:.3f}, output {ppl['output']:.3f}; "
            f"per word ({report['text_words']} words): base {words['base']:.3f}, output {words['output']:.3f}"
        )
    if report["ok"]:
        if preserving:
            out.print("ok: the result is what the manifest promises (same files, same function as the base)")
        else:
            why = "a trained model" if "training_steps" in report else "a recipe that is not function-preserving"
            out.print(
                "ok: the result is what the manifest promises (same files, loads and runs, finite logits; "
                f"{why} promises no more)"
            )
