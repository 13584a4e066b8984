"""`opt-deus inspect`: an output's layers and alignment figures, one layer's plan, or a base model's adjacent layers."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from ..figures import image_format, require_matplotlib
from .common import PlainUsage, app, fail, out, progress_bar, run, warn, writable_file


@app.command(cls=PlainUsage, short_help="An output's layers and alignment figures, or a base model's adjacent layers.")
def inspect(
    model_dir: str = typer.Argument(
        ...,
        metavar="DIR",
        help="An opt-deus output (with its manifest) or a base model (a directory or a Hub repo id).",
    ),
    layer: int | None = typer.Option(
        None, "--layer", help="On an output: a new layer; recompute and show its cost matrix and plan."
    ),
    group: str | None = typer.Option(None, "--group", help="With --layer: attention | mlp (default mlp)."),
    png: Path | None = typer.Option(
        None,
        "--png",
        help="Also draw to this image file (PNG, or what its "
        "extension names: .svg, .pdf, .jpg, ...): the layer's matrices (--layer), "
        "the new layers' alignment figures (an output), or the adjacent-layer survey (a base model).",
    ),
    save: Path | None = typer.Option(None, "--save", help="With --layer: write the raw matrices to this .npz file."),
    base: Path | None = typer.Option(
        None, "--base", help="With --layer: the base model, if it moved since the manifest was written."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", help="On a base model: the alignment settings to survey with (default corrected/exact)."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Look into an up-scaled model (layers, alignment figures, heatmaps of a layer's plan) or a
    base model (how far apart adjacent layers are before and after alignment)."""
    # an output's table and every refusal need neither torch nor transformers: the work imports them
    from .. import inspect as ins
    from ..devices import check_device
    from ..hub import resolve_model
    from ..manifest import read_manifest
    from ..recipe import load_recipe

    run(check_device, device)
    model_dir = run(resolve_model, model_dir).path
    manifest = run(read_manifest, model_dir)
    _refuse_what_does_not_apply(model_dir, manifest, layer, group, save, base, recipe)
    if manifest is not None:
        run(ins.check_output_sizes, model_dir, manifest)
    writable_file(png, "--png")
    if png:
        run(image_format, png)  # before any work: the extension names a format matplotlib writes
    writable_file(save, "--save")
    if png:  # before any work: drawing needs the `plot` extra
        run(require_matplotlib, "--png")
    if layer is not None and not as_json:
        run(require_matplotlib, "drawing heatmaps (--layer; --json prints the figures alone)")
    if layer is not None:
        group = group or "mlp"
        m = run(ins.layer_matrices, model_dir, layer, group, base, device)
        panels = ins.heatmap_panels(m)
        title = f"layer {m.layer} ({group}): aligning base layer {m.sources[0]} onto {m.sources[1]}"
        if save:
            run(ins.save_npz, save, m)
        if png:
            run(ins.save_png, png, m, title)
        if as_json:
            out.print_json(
                data={
                    "layer": m.layer,
                    "group": group,
                    "sources": list(m.sources),
                    "shape": list(m.cost.shape),
                    "report": m.report,
                    "png": str(png) if png else None,
                    "npz": str(save) if save else None,
                }
            )
            return
        out.print(title)
        figures = m.report
        out.print(
            f"cost before {figures.get('cost_before', float('nan')):.4g} -> after {figures.get('cost_after') or float('nan'):.4g}, "
            f"permutation-likeness {figures.get('permutation_likeness', float('nan')):.3f}, "
            f"solver {figures.get('solver')}, iterations {figures.get('iterations')}, converged {figures.get('converged')}"
        )
        plain = out.color_system is None or out.no_color  # piped or NO_COLOR: coloured cells would be blank
        for name, matrix, cmap in panels:
            out.print(ins.terminal_heatmap(matrix, name, cmap, plain=plain))
        _said_written(as_json, save, png)
        return
    if manifest is not None:
        if png:
            run(ins.save_profile_png, png, run(ins.output_profile, manifest))
        rows = ins.layer_rows(manifest)
        if as_json:
            out.print_json(
                data={
                    "function_preserving": manifest.function_preserving,
                    "layers": rows,
                    "new_layers": manifest.new_layers,
                    "warnings": manifest.warnings,
                    "png": str(png) if png else None,
                }
            )
            return
        _print_layer_table(manifest, rows)
        for warning in manifest.warnings:
            warn(warning)
        _said_written(as_json, png)
        return
    settings = run(ins.alignment_of, run(load_recipe, recipe)) if recipe else ins.AlignmentSettings()
    with progress_bar(enabled=not as_json) as bar:
        task = bar.add_task("aligning", total=None)
        survey = run(
            ins.pair_distances,
            model_dir,
            settings,
            device,
            lambda d, done, total: bar.update(task, description=d, completed=done, total=total),
        )
    if png:
        run(ins.save_pair_png, png, survey)
    if as_json:
        out.print_json(data=survey)
        return
    out.print(
        f"{survey['model_type']}, {survey['layers']} layers: mean matched cost of adjacent layers "
        f"(█ after alignment, ░ what alignment removed)"
    )
    out.print(ins.terminal_bars(survey))
    for name, picks in survey["recipes"].items():
        out.print(
            f"recipe {name:<20} " + (f"inserts after base layers {picks}" if isinstance(picks, list) else picks),
            markup=False,
        )
    _said_written(as_json, png)


def _refuse_what_does_not_apply(model_dir, manifest, layer, group, save, base, recipe) -> None:
    """An option that would change nothing is refused, naming where it applies."""
    if manifest is None:
        if layer is not None:
            fail(UsageError(f"{model_dir} has no opt-deus manifest; --layer needs an up-scaled model"))
        for option, given in (("--group", group), ("--save", save), ("--base", base)):
            if given is not None:
                fail(
                    UsageError(
                        f"{option} applies with --layer on an up-scaled model; {model_dir} is a base model "
                        "(its survey takes --png, --recipe and --json)"
                    )
                )
        return
    if recipe is not None:
        fail(
            UsageError(
                f"--recipe applies to a base model (the alignment to survey with); {model_dir} is an "
                "output, whose alignment settings are in its manifest"
            )
        )
    if layer is None:
        example = f" (new layers: {', '.join(map(str, manifest.new_layers))})" if manifest.new_layers else ""
        for option, given in (("--group", group), ("--save", save), ("--base", base)):
            if given is not None:
                fail(UsageError(f"{option} applies with --layer N{example}"))


def _print_layer_table(manifest, rows: list[dict]) -> None:
    from rich.table import Table

    from .. import inspect as ins

    out.print(
        f"{manifest.base.model_type}: {manifest.base.num_layers} -> {manifest.output.num_layers} layers, "
        f"recipe {manifest.method}, function-preserving: {'yes' if manifest.function_preserving else 'no'}"
    )
    table = Table(
        "out",
        "origin",
        "src",
        "method",
        "zeroed",
        "attn cost",
        "mlp cost",
        "perm-like",
        "iters",
        "conv",
        box=None,
        caption="cost: mean matched cost before -> after alignment; figures per group (attention, mlp)",
    )
    for row in rows:
        cells = []
        for g in ins.GROUPS:
            f = row.get(g)
            cells.append(
                f"{f['cost_before']:.3g}→{f['cost_after']:.3g}" if f and f.get("cost_after") is not None else ""
            )
        figs = [row[g] for g in ins.GROUPS if row.get(g)]
        likeness = ",".join(
            f"{f['permutation_likeness']:.2f}" for f in figs if f.get("permutation_likeness") is not None
        )
        iters = ",".join(str(f["iterations"]) for f in figs if f.get("iterations") is not None)
        converged = ",".join("yes" if f["converged"] else "NO" for f in figs if f.get("converged") is not None)
        table.add_row(
            str(row["index"]),
            row["origin"],
            ",".join(map(str, row["sources"])),
            row["method"],
            str(row["zeroed"]),
            *cells,
            likeness,
            iters,
            converged,
        )
    out.print(table)


def _said_written(as_json: bool, *paths: Path | None) -> None:
    if not as_json:
        for path in paths:
            if path is not None:
                out.print(f"wrote {path}")
