"""`opt-deus recipes`: the shipped recipes."""

from __future__ import annotations

import typer

from .common import app, out

@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the shipped recipes, one line each."""
    import yaml

    from ..recipe import shipped_recipes

    rows = []
    for name, path in shipped_recipes().items():
        data = yaml.safe_load(path.read_text()) or {}
        rows.append({"name": name, "method": data.get("method"), "description": data.get("description", ""), "path": str(path)})
    if as_json:
        out.print_json(data=rows)
        return
    for row in rows:
        out.print(f"{row['name']:<22} {row['method']:<9} {row['description']}")
