"""`opt-deus recipes [MODEL]`: the shipped recipes, and which of them fit a given model."""

from __future__ import annotations

import typer

from .common import PlainUsage, app, out, run


@app.command(cls=PlainUsage, short_help="The shipped recipes; with MODEL, which of them fit it.")
def recipes(
    model: str | None = typer.Argument(
        None,
        metavar="MODEL",
        help="A base model (directory or Hub repo id): say which recipes fit it and how deep each makes it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List the shipped recipes, one line each; with MODEL, whether each fits that model (its
    depth, family and layout, as `upscale --dry-run` checks them) and the depth it gives."""
    import yaml

    from ..recipe import shipped_recipes

    rows = []
    for name, path in shipped_recipes().items():
        data = yaml.safe_load(path.read_text()) or {}
        rows.append(
            {"name": name, "method": data.get("method"), "description": data.get("description", ""), "path": str(path)}
        )
    if model is not None:
        fits = run(_fits, model, [row["name"] for row in rows])
        for row in rows:
            row.update(fits[row["name"]])
    if as_json:
        out.print_json(data=rows)
        return
    for row in rows:
        if model is None:
            depth = f"{EXAMPLE_DEPTH} -> {_depth_for(row['name'], EXAMPLE_DEPTH)} layers"
            out.print(f"{row['name']:<22} {row['method']:<9} {depth:<18} {row['description']}", markup=False)
        elif row["fits"]:
            depth = f"{row['base_layers']} -> {row['output_layers']} layers"
            out.print(f"{row['name']:<22} {row['method']:<9} {depth:<18} {row['description']}", markup=False)
        else:
            out.print(f"{row['name']:<22} {row['method']:<9} {'does not fit':<18} {row['why']}", markup=False)
    if model is None:
        out.print(
            f"depths for a base of {EXAMPLE_DEPTH} layers (LLaMA-3.1-8B); counts like 50% follow the "
            "model's depth: `opt-deus recipes MODEL` says which recipes fit a model and how deep each makes it"
        )


EXAMPLE_DEPTH = 32  # the paper's base, LLaMA-3.1-8B


def _depth_for(name: str, base_layers: int) -> int:
    """Output depth of a shipped recipe for a base of this depth (from the recipe, as upscale resolves it)."""
    from ..layers import recipe_layers
    from ..recipe import load_recipe

    return len(recipe_layers(load_recipe(name), base_layers))


def _fits(model: str, names: list[str]) -> dict[str, dict]:
    """name -> {fits, base_layers, output_layers} or {fits: False, why}, from the model's metadata."""
    from ..errors import OptDeusError
    from ..hub import resolve_model
    from ..job import resolve_job
    from ..options import Options
    from ..recipe import load_recipe
    from ..source import SourceModel

    source = SourceModel.open(resolve_model(model).path)
    found = {}
    for name in names:
        recipe = load_recipe(name)
        try:
            job = resolve_job(source, recipe, Options(device="cpu"))
            found[name] = {"fits": True, "base_layers": job.base_layers, "output_layers": len(job.layers)}
        except OptDeusError as e:
            found[name] = {"fits": False, "why": str(e).removeprefix(f"recipe {recipe.source}: ")}
    return found
