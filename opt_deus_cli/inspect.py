"""`opt-deus inspect`: what did the up-scaling do, and where should layers go?

- on an output directory: the manifest as a table of layers and alignment figures;
- on one new layer: recompute its cost matrix and plan from the base checkpoint, as heatmaps
  whose columns are reordered by the matching, so a good alignment reads as a bright diagonal;
- on a base model: how far apart each adjacent pair of layers is before and after alignment.
Reads at most two base layers at a time (as upscale does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .devices import resolve_device
from .errors import OptDeusError, UsageError
from .layers import recipe_layers
from .manifest import Manifest, read_manifest
from .methods.opt_deus import OptDeusMethod
from .methods.opt_deus.matrices import alignment_matrices
from .methods.opt_deus.settings import AlignmentSettings
from .recipe import Positions, Recipe, load_recipe, shipped_recipes
from .settings import parse_settings
from .source import SourceModel

GROUPS = ("attention", "mlp")


def layer_rows(manifest: Manifest) -> list[dict]:
    """One row per output layer, with the alignment figures of new layers flattened."""
    rows = []
    for layer in manifest.layers:
        row = {"index": layer.index, "origin": layer.origin, "sources": layer.sources, "method": layer.method}
        row["zeroed"] = len(layer.zeroed)
        report = layer.report or {}
        for group in GROUPS:
            figures = report.get(group)
            if figures:
                row[group] = {k: figures.get(k) for k in ("solver", "cost_before", "cost_after", "permutation_likeness", "iterations", "converged")}
        rows.append(row)
    return rows


# ---- one new layer: matrices ----------------------------------------------------------------

@dataclass
class LayerMatrices:
    layer: int
    group: str
    sources: tuple[int, int]
    cost: np.ndarray  # (n, m) units of A (rows) vs units of B (columns), identity order
    plan: np.ndarray  # (n, m)
    order: np.ndarray  # (m,) column order that puts each row's match on the diagonal
    report: dict
    extra: dict  # other levels (KV groups, value dims) as arrays

    @property
    def cost_after(self) -> np.ndarray:
        return self.cost[:, self.order]

    @property
    def plan_after(self) -> np.ndarray:
        return self.plan[:, self.order]


def matching_order(plan: np.ndarray) -> np.ndarray:
    """Columns reordered so that row i's partner sits in column i (a soft plan is rounded to
    the permutation carrying the most mass)."""
    rows, cols = linear_sum_assignment(-plan)
    order = np.empty(plan.shape[1], dtype=np.int64)
    order[rows] = cols
    return order


def settings_from_manifest(manifest: Manifest) -> AlignmentSettings:
    if manifest.method != "opt-deus":
        raise OptDeusError(f"this model was built with method {manifest.method!r}; only opt-deus layers have an alignment to show")
    # manifests before settings.unused() recorded every field, used or not
    return parse_settings(AlignmentSettings, manifest.recipe.get("alignment"), "manifest recipe", "alignment", allow_unused=True)


def alignment_of(recipe: Recipe) -> AlignmentSettings:
    """The alignment settings of an opt-deus recipe (for --recipe on a base model)."""
    if "alignment" not in recipe.settings:
        raise UsageError(f"--recipe {recipe.source}: method {recipe.method!r} aligns nothing; give an opt-deus recipe")
    return recipe.settings["alignment"]


def layer_matrices(out_dir: Path, layer: int, group: str, base_dir: Path | None, device: str) -> LayerMatrices:
    manifest = read_manifest(out_dir, required=True)
    if not 0 <= layer < len(manifest.layers):
        raise UsageError(f"--layer {layer}: the model has layers 0..{len(manifest.layers) - 1}")
    entry = manifest.layer(layer)
    if not entry.is_new or len(entry.sources) != 2:
        raise UsageError(f"--layer {layer} is not a new layer built from two neighbours; new layers: {manifest.new_layers}")
    settings = settings_from_manifest(manifest)
    base = Path(base_dir or manifest.base.path)
    if not base.is_dir():
        raise OptDeusError(f"the base model {base} named in the manifest is not there; pass --base DIR")
    return pair_matrices(base, tuple(entry.sources), group, settings, device, layer)


def pair_matrices(base: Path, sources: tuple[int, int], group: str, settings: AlignmentSettings, device: str, layer: int = -1) -> LayerMatrices:
    if group not in GROUPS:
        raise UsageError(f"--group {group!r}: use attention or mlp")
    source = SourceModel.open(base)
    lower, upper, ctx = source.canonical_pair(sources, resolve_device(device))
    found = alignment_matrices(lower, upper, ctx, settings, group)
    as_np = {k: v.double().numpy() for k, v in found.items() if isinstance(v, torch.Tensor)}
    cost, plan = as_np.pop("cost"), as_np.pop("plan")
    return LayerMatrices(layer, group, sources, cost, plan, matching_order(plan), found.get("report", {}), as_np)


# ---- base model: how far apart adjacent layers are --------------------------------------------

def pair_distances(model_dir: Path, settings: AlignmentSettings, device: str, progress=None) -> dict:
    """For each adjacent pair (k, k+1): the mean matched cost before (identity pairing) and after
    alignment, per group, from the same alignment upscale would run."""
    source = SourceModel.open(model_dir)
    dev = resolve_device(device)
    method = OptDeusMethod(settings)
    pairs = []
    for k in range(source.depth - 1):
        if progress:
            progress(f"aligning layers {k} and {k + 1}", k, source.depth - 1)
        _, report = method.build(*source.canonical_pair((k, k + 1), dev))
        row = {"pair": [k, k + 1]}
        for group in GROUPS:
            figures = report[group]
            row[group] = {"cost_before": figures["cost_before"], "cost_after": figures["cost_after"],
                          "converged": figures.get("converged", True)}
        pairs.append(row)
    return {"model_type": source.arch.model_type, "layers": source.depth, "pairs": pairs,
            "recipes": shipped_positions(source.depth)}


def shipped_positions(base_layers: int) -> dict[str, list[int] | str]:
    """Where each shipped recipe would insert layers (after which base layers) in a model of this depth."""
    picks: dict[str, list[int] | str] = {}
    for name in shipped_recipes():
        recipe = load_recipe(name)
        if not isinstance(recipe.placement, Positions):  # stacks of slices insert nothing between layers
            continue
        try:
            picks[name] = [layer.sources[0] for layer in recipe_layers(recipe, base_layers) if layer.is_new]
        except OptDeusError as e:
            picks[name] = f"not applicable: {e}"
    return picks


# ---- pictures --------------------------------------------------------------------------------

def downsample(matrix: np.ndarray, size: int) -> np.ndarray:
    """Block means down to at most size x size cells (keeps the diagonal a diagonal)."""
    t = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))[None, None]
    rows, cols = min(size, matrix.shape[0]), min(size, matrix.shape[1])
    return torch.nn.functional.adaptive_avg_pool2d(t, (rows, cols))[0, 0].numpy()


def heatmap_panels(m: LayerMatrices) -> list[tuple[str, np.ndarray, str]]:
    """(title, matrix, colour map) of the three pictures: bright = cheap cost / much mass."""
    return [
        ("cost before alignment (identity pairing)", m.cost, "viridis_r"),
        ("cost after alignment (columns matched)", m.cost_after, "viridis_r"),
        ("transport plan (columns matched)", m.plan_after, "magma"),
    ]


def save_png(path: Path, panels: list[tuple[str, np.ndarray, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), dpi=100)
    for ax, (name, matrix, cmap) in zip(np.atleast_1d(axes), panels):
        image = ax.imshow(matrix, cmap=cmap, interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("units of the upper layer B")
        ax.set_ylabel("units of the lower layer A")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_pair_png(path: Path, survey: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [f"{p['pair'][0]}-{p['pair'][1]}" for p in survey["pairs"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    for ax, group in zip(axes, GROUPS):
        before = [p[group]["cost_before"] for p in survey["pairs"]]
        after = [p[group]["cost_after"] for p in survey["pairs"]]
        ax.plot(pairs, before, marker="o", label="before alignment")
        ax.plot(pairs, after, marker="o", label="after alignment")
        ax.set_title(f"{group}: mean matched cost between adjacent layers", fontsize=9)
        ax.set_xlabel("layer pair (k, k+1)")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_npz(path: Path, m: LayerMatrices) -> None:
    np.savez_compressed(path, cost=m.cost, plan=m.plan, order=m.order, sources=np.array(m.sources),
                        **{k: v for k, v in m.extra.items()})


def terminal_heatmap(matrix: np.ndarray, title: str, cmap: str, size: int = 32):
    """A rich renderable: the matrix downsampled to size x size coloured cells, with a legend."""
    import matplotlib
    from rich.text import Text

    small = downsample(matrix, size)
    lo, hi = float(small.min()), float(small.max())
    colours = matplotlib.colormaps[cmap]
    text = Text(f"{title}  [{matrix.shape[0]}x{matrix.shape[1]} shown as {small.shape[0]}x{small.shape[1]}]\n")
    scale = (hi - lo) or 1.0
    for row in small:
        for value in row:
            r, g, b, _ = colours((value - lo) / scale)
            text.append("  ", style=f"on #{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
        text.append("\n")
    text.append("legend: ")
    for step in range(9):
        r, g, b, _ = colours(step / 8)
        text.append("  ", style=f"on #{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    text.append(f"  {lo:.4g} .. {hi:.4g}\n")
    return text


def terminal_bars(survey: dict, width: int = 24):
    """A rich table: one row per adjacent pair and group, a bar of the cost after alignment (█)
    and of what alignment removed (░), scaled to the largest cost of the group."""
    from rich.table import Table

    table = Table("pair", "group", "cost before -> after", "", box=None)
    peak = {g: max(p[g]["cost_before"] for p in survey["pairs"]) or 1.0 for g in GROUPS}
    for p in survey["pairs"]:
        for g in GROUPS:
            before, after = p[g]["cost_before"], p[g]["cost_after"]
            bar = "█" * round(width * after / peak[g])
            bar += "░" * max(0, round(width * before / peak[g]) - len(bar))
            table.add_row(f"{p['pair'][0]}-{p['pair'][1]}" if g == GROUPS[0] else "", g, f"{before:.4g} -> {after:.4g}", bar)
    return table
