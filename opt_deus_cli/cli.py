"""The `opt-deus` command line: parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import OptDeusError, UsageError

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
    from .output import Terminated

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


@app.command()
def upscale(
    model_dir: Optional[Path] = typer.Argument(None, help="Base model directory (config.json + *.safetensors); or `model:` in the recipe."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML path or shipped recipe name (see `opt-deus recipes`)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory; or `output:` in the recipe."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("keep", help="keep | bfloat16 | float16 | float32"),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    overwrite: bool = typer.Option(False, help="Replace an existing output (only once the new one is complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved layer plan; write nothing."),
    allow_nonfinite: bool = typer.Option(False, help="Do not refuse NaN/Inf in source tensors."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Build a deeper checkpoint from MODEL_DIR with a recipe, and a manifest of what was done."""
    from .recipe import load_recipe
    from .job import Options
    from .upscale import dry_run as run_dry_run, upscale as run_upscale

    parsed = run(load_recipe, recipe)
    model = model_dir or (Path(parsed.model) if parsed.model else None)
    target = out_dir or (Path(parsed.output) if parsed.output else None)
    if model is None:
        fail(UsageError("no model: give MODEL_DIR or set `model:` in the recipe"))
    if target is None and not dry_run:
        fail(UsageError("no output: give --out OUT_DIR or set `output:` in the recipe"))
    options = Options(device=device, dtype=dtype, shard_size=shard_size, overwrite=overwrite,
                      allow_nonfinite=allow_nonfinite)
    if dry_run:
        result = run(run_dry_run, model, parsed, target, options)
        if as_json:
            out.print_json(data=result)
        else:
            _print_plan(result["plan"])
        return
    with _progress(enabled=not as_json) as bar:
        task = bar.add_task("up-scaling", total=None)

        def on_progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        manifest = run(run_upscale, model, parsed, target, options, on_progress)
    for warning in manifest.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    summary = {
        "output": manifest.output.path,
        "base_layers": manifest.base.num_layers,
        "output_layers": manifest.output.num_layers,
        "new_layers": manifest.new_layers,
        "method": manifest.method,
        "function_preserving": manifest.function_preserving,
        "trainable_parameter_regex": manifest.trainable_parameter_regex,
        "files": len(manifest.output.files),
        "bytes": sum(f.bytes for f in manifest.output.files),
        "seconds": manifest.timings["total"],
        "warnings": manifest.warnings,
    }
    if as_json:
        out.print_json(data=summary)
    else:
        out.print(
            f"wrote {summary['output']}: {summary['base_layers']} -> {summary['output_layers']} layers "
            f"({summary['method']}, new {summary['new_layers']}), {summary['files']} files, "
            f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s; "
            f"function-preserving: {'yes' if summary['function_preserving'] else 'no'}"
        )
        out.print(f"train only the new layers with: {summary['trainable_parameter_regex']}")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not enabled or not console.is_terminal,  # else rich adds a blank line after errors
    )


def _print_plan(plan: dict) -> None:
    out.print(
        f"{plan['model_type']}: {plan['base_layers']} -> {plan['output_layers']} layers, method {plan['method']}, "
        f"zero_init {plan['zero_init'] or 'none'}, function-preserving: {'yes' if plan['function_preserving'] else 'no'}"
    )
    table = Table("out", "origin", "sources", "method", box=None)
    for layer in plan["layers"]:
        table.add_row(str(layer["index"]), layer["origin"], ",".join(map(str, layer["sources"])), layer["method"])
    out.print(table)


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
    from .devices import resolve_device
    from .verify import verify as run_verify

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


@app.command()
def inspect(
    model_dir: Path = typer.Argument(..., help="An opt-deus output (with its manifest) or a base model."),
    layer: Optional[int] = typer.Option(None, "--layer", help="A new layer: recompute and show its cost matrix and plan."),
    group: str = typer.Option("mlp", "--group", help="attention | mlp (with --layer)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write the pictures to this PNG file."),
    save: Optional[Path] = typer.Option(None, "--save", help="With --layer: write the raw matrices to this .npz file."),
    base: Optional[Path] = typer.Option(None, "--base", help="The base model, if it moved since the manifest was written."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="On a base model: the alignment settings to use (default corrected/exact)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Look into an up-scaled model (layers, alignment figures, heatmaps of a layer's plan) or a
    base model (how far apart adjacent layers are before and after alignment)."""
    from . import inspect as ins
    from .manifest import read_manifest
    from .recipe import load_recipe

    manifest = run(read_manifest, model_dir)
    if layer is not None:
        if manifest is None:
            fail(UsageError(f"{model_dir} has no opt-deus manifest; --layer needs an up-scaled model"))
        m = run(ins.layer_matrices, model_dir, layer, group, base, device)
        panels = ins.heatmap_panels(m)
        title = f"layer {m.layer} ({group}): aligning base layer {m.sources[0]} onto {m.sources[1]}"
        if save:
            ins.save_npz(save, m)
        if png:
            ins.save_png(png, panels, title)
        if as_json:
            out.print_json(data={"layer": m.layer, "group": group, "sources": list(m.sources), "shape": list(m.cost.shape),
                                 "report": m.report, "png": str(png) if png else None, "npz": str(save) if save else None})
            return
        out.print(title)
        figures = m.report
        out.print(f"cost before {figures.get('cost_before', float('nan')):.4g} -> after {figures.get('cost_after') or float('nan'):.4g}, "
                  f"permutation-likeness {figures.get('permutation_likeness', float('nan')):.3f}, "
                  f"solver {figures.get('solver')}, iterations {figures.get('iterations')}, converged {figures.get('converged')}")
        for name, matrix, cmap in panels:
            out.print(ins.terminal_heatmap(matrix, name, cmap))
        return
    if manifest is not None:
        rows = ins.layer_rows(manifest)
        if as_json:
            out.print_json(data={"function_preserving": manifest.function_preserving, "layers": rows,
                                 "new_layers": manifest.new_layers, "warnings": manifest.warnings})
            return
        out.print(f"{manifest.base.model_type}: {manifest.base.num_layers} -> {manifest.output.num_layers} layers, "
                  f"recipe {manifest.method}, function-preserving: {'yes' if manifest.function_preserving else 'no'}")
        table = Table("out", "origin", "src", "method", "zeroed", "attn cost", "mlp cost", "perm-like", "iters", "conv",
                      box=None, caption="cost: mean matched cost before -> after alignment; figures per group (attention, mlp)")
        for row in rows:
            cells = []
            for g in ins.GROUPS:
                f = row.get(g)
                cells.append(f"{f['cost_before']:.3g}→{f['cost_after']:.3g}" if f and f.get("cost_after") is not None else "")
            figs = [row[g] for g in ins.GROUPS if row.get(g)]
            likeness = ",".join(f"{f['permutation_likeness']:.2f}" for f in figs if f.get("permutation_likeness") is not None)
            iters = ",".join(str(f["iterations"]) for f in figs if f.get("iterations") is not None)
            converged = ",".join("yes" if f["converged"] else "NO" for f in figs if f.get("converged") is not None)
            table.add_row(str(row["index"]), row["origin"], ",".join(map(str, row["sources"])), row["method"],
                          str(row["zeroed"]), *cells, likeness, iters, converged)
        out.print(table)
        for warning in manifest.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        return
    settings = run(ins.alignment_of, run(load_recipe, recipe)) if recipe else ins.AlignmentSettings()
    with _progress(enabled=not as_json) as bar:
        task = bar.add_task("aligning", total=None)
        survey = run(ins.pair_distances, model_dir, settings, device,
                     lambda d, done, total: bar.update(task, description=d, completed=done, total=total))
    if png:
        ins.save_pair_png(png, survey)
    if as_json:
        out.print_json(data=survey)
        return
    out.print(f"{survey['model_type']}, {survey['layers']} layers: mean matched cost of adjacent layers "
              f"(█ after alignment, ░ what alignment removed)")
    out.print(ins.terminal_bars(survey))
    for name, picks in survey["recipes"].items():
        out.print(f"recipe {name:<20} inserts after base layers {picks}")


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the shipped recipes, one line each."""
    import yaml

    from .recipe import shipped_recipes

    rows = []
    for name, path in shipped_recipes().items():
        data = yaml.safe_load(path.read_text()) or {}
        rows.append({"name": name, "method": data.get("method"), "description": data.get("description", ""), "path": str(path)})
    if as_json:
        out.print_json(data=rows)
        return
    for row in rows:
        out.print(f"{row['name']:<22} {row['method']:<9} {row['description']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
