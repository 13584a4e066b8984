"""`opt-deus upscale`: model + recipe -> deeper checkpoint + manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from .common import PlainUsage, app, fail, out, progress_bar, run, warn


@app.command(cls=PlainUsage, short_help="Build a deeper checkpoint from MODEL with a recipe, and its manifest.")
def upscale(
    model_dir: str | None = typer.Argument(
        None,
        metavar="MODEL",
        help="Base model: a directory (config.json + *.safetensors) or a Hub repo id (org/name); or `model:` in the recipe.",
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="With a Hub repo id: a branch, tag or commit (default main)."
    ),
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="Recipe YAML path or shipped recipe name (see `opt-deus recipes`)."
    ),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Output directory; or `output:` in the recipe."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("keep", help="keep | bfloat16 | float16 | float32 (or bf16, fp16, fp32)"),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB (or 5G), 500MB (or 500M), 2GiB."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output (only once the new one is complete)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved layer plan; write nothing."),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Copy NaN/Inf in source tensors through (copy, average, stack)."
    ),
    memory_budget: str | None = typer.Option(
        None,
        "--memory-budget",
        help="Refuse, before any work, a job whose new layers would need more memory than this, e.g. 4GB (default: the RAM free now).",
    ),
    copy_extra: list[str] | None = typer.Option(
        None,
        "--copy-extra",
        metavar="GLOB",
        help="Also copy the base's files matching GLOB (repeatable); by default only tokenizer, generation config, chat template, licence and notice files are.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Build a deeper checkpoint from MODEL with a recipe, and a manifest of what was done."""
    # the arguments are checked before torch or transformers is imported (by the work, below)
    from ..options import Options

    options = Options(
        device=device,
        dtype=dtype,
        shard_size=shard_size,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        memory_budget=memory_budget,
        copy_extra=tuple(copy_extra or ()),
    )
    run(options.check)  # the cheapest refusals first: no recipe, job or model module imported yet
    from ..hub import resolve_model
    from ..recipe import load_recipe

    parsed = run(load_recipe, recipe)
    model = model_dir or parsed.model
    target = out_dir or (Path(parsed.output) if parsed.output else None)
    if model is None:
        fail(UsageError("no model: give MODEL (a directory or a Hub repo id) or set `model:` in the recipe"))
    if target is None and not dry_run:
        fail(UsageError("no output: give --out OUT_DIR or set `output:` in the recipe"))
    model = run(resolve_model, model, revision)
    from ..upscale import dry_run as run_dry_run
    from ..upscale import upscale as run_upscale

    if dry_run:
        result = run(run_dry_run, model, parsed, target, options)
        if as_json:
            out.print_json(data=result)
        else:
            _print_plan(result["plan"])
        return
    with progress_bar(enabled=not as_json) as bar:
        task = bar.add_task("up-scaling", total=None)

        def on_progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        manifest = run(run_upscale, model, parsed, target, options, on_progress)
    for warning in manifest.warnings:
        warn(warning)
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
        out.print(
            f"next: opt-deus train {summary['output']} --data FILES --out DIR, or a config for another trainer: opt-deus handoff {summary['output']} --for axolotl|llama-factory|peft|trainer"
        )


def _print_plan(plan: dict) -> None:
    from rich.table import Table

    out.print(
        f"{plan['model_type']}: {plan['base_layers']} -> {plan['output_layers']} layers, method {plan['method']}, "
        f"zero_init {plan['zero_init'] or 'none'}, function-preserving: {'yes' if plan['function_preserving'] else 'no'}"
    )
    table = Table("out", "origin", "sources", "method", box=None)
    for layer in plan["layers"]:
        table.add_row(str(layer["index"]), layer["origin"], ",".join(map(str, layer["sources"])), layer["method"])
    out.print(table)
