"""`opt-deus inspect`: what did the up-scaling do, and where should layers go?

- on an output directory: the manifest as a table of layers and alignment figures;
- on one new layer: recompute its cost matrix and plan from the base checkpoint, as heatmaps
  whose columns are reordered by the matching (a good alignment: a dark diagonal of cost, a bright
  one of mass) and the matched costs against the unmatched ones;
- on a base model: how far apart each adjacent pair of layers is before and after alignment.
Reads at most two base layers at a time (as upscale does)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OptDeusError, UsageError
from .figures import image_format, pyplot, require_matplotlib
from .layers import recipe_layers
from .manifest import Manifest, read_manifest
from .methods.opt_deus import OptDeusMethod
from .methods.opt_deus.settings import AlignmentSettings
from .output import current_umask
from .recipe import Positions, Recipe, load_recipe, shipped_recipes
from .settings import parse_settings

# torch, scipy and the base model's reading are imported by the functions that compute: an
# output's table (the manifest alone) and the command's usage errors come without them

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
                row[group] = {
                    k: figures.get(k)
                    for k in ("solver", "cost_before", "cost_after", "permutation_likeness", "iterations", "converged")
                }
        rows.append(row)
    return rows


def check_output_sizes(model_dir: Path, manifest: Manifest) -> None:
    """OptDeusError when a file the manifest recorded is missing or has another size (a truncated
    copy, an interrupted transfer): the table would describe weights that are not there. Sizes
    only, so inspect stays instant; `verify` compares the sha256s."""
    wrong = []
    for entry in manifest.output.files:
        path = Path(model_dir) / entry.name
        if not path.is_file():
            wrong.append(f"{entry.name} is missing")
        elif path.stat().st_size != entry.bytes:
            wrong.append(f"{entry.name} has {path.stat().st_size} bytes, the manifest recorded {entry.bytes}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise OptDeusError(
            f"{model_dir} is not the output opt-deus wrote: {wrong[0]}{more}; it is truncated or "
            "changed (`opt-deus verify BASE OUT` checks every file)"
        )


def output_profile(manifest: Manifest) -> dict:
    """The new layers' alignment figures (cost before/after per group), the whole model's
    counterpart of pair_distances for `inspect OUT --png`."""
    rows = [row for row in layer_rows(manifest) if row["origin"] == "new" and all(row.get(g) for g in GROUPS)]
    if not rows or any(row[g].get("cost_after") is None for row in rows for g in GROUPS):
        raise UsageError(
            f"this model was built with method {manifest.method!r}: its new layers have no alignment "
            "figures to draw (only opt-deus outputs do); --png draws a base model's adjacent layers too"
        )
    return {
        "labels": [f"{row['index']} ({row['sources'][0]},{row['sources'][1]})" for row in rows],
        "costs": {g: ([row[g]["cost_before"] for row in rows], [row[g]["cost_after"] for row in rows]) for g in GROUPS},
    }


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
    units: str = "units"  # what a row / column is: query heads, neurons, experts, rows of q_proj

    @property
    def matched_costs(self) -> np.ndarray:
        """(n,) cost of each row's matched column: the diagonal of cost_after."""
        return np.diagonal(self.cost_after).copy()

    @property
    def unmatched_costs(self) -> np.ndarray:
        """Every other entry of the cost matrix: what the matching avoided."""
        after = self.cost_after
        return after[~np.eye(*after.shape, dtype=bool)]

    @property
    def cost_after(self) -> np.ndarray:
        return self.cost[:, self.order]

    @property
    def plan_after(self) -> np.ndarray:
        return self.plan[:, self.order]


def matching_order(plan: np.ndarray) -> np.ndarray:
    """Columns reordered so that row i's partner sits in column i (a soft plan is rounded to
    the permutation carrying the most mass)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-plan)
    order = np.empty(plan.shape[1], dtype=np.int64)
    order[rows] = cols
    return order


def settings_from_manifest(manifest: Manifest) -> AlignmentSettings:
    if manifest.method != "opt-deus":
        raise OptDeusError(
            f"this model was built with method {manifest.method!r}; only opt-deus layers have an alignment to show"
        )
    # manifests before settings.unused() recorded every field, used or not
    return parse_settings(
        AlignmentSettings, manifest.recipe.get("alignment"), "manifest recipe", "alignment", allow_unused=True
    )


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
        raise UsageError(
            f"--layer {layer} is not a new layer built from two neighbours; new layers: {manifest.new_layers}"
        )
    settings = settings_from_manifest(manifest)
    base = Path(base_dir or manifest.base.path)
    if not base.is_dir():
        raise OptDeusError(f"the base model {base} named in the manifest is not there; pass --base DIR")
    return pair_matrices(base, tuple(entry.sources), group, settings, device, layer)


def pair_matrices(
    base: Path, sources: tuple[int, int], group: str, settings: AlignmentSettings, device: str, layer: int = -1
) -> LayerMatrices:
    if group not in GROUPS:
        raise UsageError(f"--group {group!r}: use attention or mlp")
    import torch

    from .devices import resolve_device
    from .methods.opt_deus.matrices import alignment_matrices
    from .source import SourceModel

    source = SourceModel.open(base)
    lower, upper, ctx = source.canonical_pair(sources, resolve_device(device))
    found = alignment_matrices(lower, upper, ctx, settings, group)
    as_np = {k: v.double().numpy() for k, v in found.items() if isinstance(v, torch.Tensor)}
    cost, plan = as_np.pop("cost"), as_np.pop("plan")
    if settings.mode == "reference":  # the published method aligns rows of one tensor
        units = "rows of q_proj" if group == "attention" else "rows of gate_proj"
    else:
        units = "query heads" if group == "attention" else "experts" if source.arch.experts else "neurons"
    return LayerMatrices(layer, group, sources, cost, plan, matching_order(plan), found.get("report", {}), as_np, units)


# ---- base model: how far apart adjacent layers are --------------------------------------------


def pair_distances(model_dir: Path, settings: AlignmentSettings, device: str, progress=None) -> dict:
    """For each adjacent pair (k, k+1): the mean matched cost before (identity pairing) and after
    alignment, per group, from the same alignment upscale would run."""
    from .devices import resolve_device
    from .source import SourceModel

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
            row[group] = {
                "cost_before": figures["cost_before"],
                "cost_after": figures["cost_after"],
                "converged": figures.get("converged", True),
            }
        pairs.append(row)
    return {
        "model_type": source.arch.model_type,
        "layers": source.depth,
        "pairs": pairs,
        "recipes": shipped_positions(source.depth),
    }


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
            picks[name] = f"does not fit: {str(e).removeprefix(f'recipe {recipe.source}: ')}"
    return picks


# ---- pictures and files --------------------------------------------------------------------


def write_file(path: Path, write) -> None:
    """write(file object) into a temporary file beside `path`, renamed into place when complete:
    an interrupted or failed write leaves nothing half-written, and the name is exactly `path`."""
    import os
    import tempfile

    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    except OSError as e:
        raise OptDeusError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; a file gets what open() gives
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OptDeusError(f"cannot write {path}: {e.strerror or e}") from e
        raise


def downsample(matrix: np.ndarray, size: int) -> np.ndarray:
    """Block means down to at most size x size cells (keeps the diagonal a diagonal)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64))[None, None]
    rows, cols = min(size, matrix.shape[0]), min(size, matrix.shape[1])
    return torch.nn.functional.adaptive_avg_pool2d(t, (rows, cols))[0, 0].numpy()


def heatmap_panels(m: LayerMatrices) -> list[tuple[str, np.ndarray, str]]:
    """(title, matrix, colour map) of the three pictures; every map runs dark = low to bright =
    high, so a good alignment is a dark diagonal of cost and a bright diagonal of mass."""
    return [
        ("cost before alignment (identity pairing)", m.cost, "viridis"),
        ("cost after alignment (columns matched)", m.cost_after, "viridis"),
        ("transport plan (columns matched)", m.plan_after, "magma"),
    ]


def _pyplot():
    return pyplot("--png")


def _save_figure(fig, path: Path) -> None:
    try:
        write_file(path, lambda fh: fig.savefig(fh, format=image_format(path)))
    finally:
        _pyplot().close(fig)


def layer_figure(m: LayerMatrices, title: str):
    """The three heatmaps, with integer ticks and the units named, and a fourth panel: the
    matched costs against every unmatched one (in a 512x512 matrix the matched diagonal is a
    line one pixel wide; the two distributions show what the matching bought)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    panels = heatmap_panels(m)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.6), dpi=100)
    lower, upper = m.sources
    for ax, (name, matrix, cmap) in zip(axes, panels):
        image = ax.imshow(matrix, cmap=cmap, interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"{m.units} of base layer {upper} (B)", fontsize=10)
        ax.set_ylabel(f"{m.units} of base layer {lower} (A)", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, fraction=0.046).set_label("mass" if "plan" in name else "cost", fontsize=9)
    matched, unmatched = m.matched_costs, m.unmatched_costs
    hist = axes[-1]
    bins = np.linspace(min(matched.min(), unmatched.min()), max(matched.max(), unmatched.max()), 40)
    hist.hist(unmatched, bins=bins, density=True, alpha=0.6, label=f"unmatched pairs ({unmatched.size})")
    hist.hist(matched, bins=bins, density=True, alpha=0.6, label=f"matched pairs ({matched.size})")
    for values, colour in ((unmatched, "C0"), (matched, "C1")):
        hist.axvline(float(values.mean()), color=colour, linestyle="--")
    hist.set_title("cost of matched vs unmatched pairs (dashed: means)", fontsize=10)
    hist.set_xlabel("cost", fontsize=10)
    hist.set_ylabel("density", fontsize=10)
    hist.legend(fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_png(path: Path, m: LayerMatrices, title: str) -> None:
    _save_figure(layer_figure(m, title), path)


def save_cost_png(path: Path, labels: list[str], costs: dict, what: str, xlabel: str) -> None:
    _save_figure(cost_figure(labels, costs, what, xlabel), path)


def cost_figure(labels: list[str], costs: dict, what: str, xlabel: str):
    """One panel per group: the mean matched cost before and after alignment, per item (an
    adjacent pair of a base model, or a new layer of an output). Labels upright while they fit."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(12, 4), dpi=100)
    for ax, group in zip(axes, GROUPS):
        before, after = costs[group]
        ax.plot(labels, before, marker="o", label="before alignment")
        ax.plot(labels, after, marker="o", label="after alignment")
        ax.set_title(f"{group}: mean matched cost {what}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="x", labelsize=9, labelrotation=0 if len(labels) <= 8 else 45)
        if len(labels) > 8:
            plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        ax.legend()
    fig.tight_layout()
    return fig


def save_pair_png(path: Path, survey: dict) -> None:
    labels = [f"{p['pair'][0]}-{p['pair'][1]}" for p in survey["pairs"]]
    costs = {
        g: ([p[g]["cost_before"] for p in survey["pairs"]], [p[g]["cost_after"] for p in survey["pairs"]])
        for g in GROUPS
    }
    save_cost_png(path, labels, costs, "between adjacent layers", "layer pair (k, k+1)")


def save_profile_png(path: Path, profile: dict) -> None:
    save_cost_png(
        path,
        profile["labels"],
        profile["costs"],
        "of the two layers each new layer fuses",
        "new layer (its base sources)",
    )


def save_npz(path: Path, m: LayerMatrices) -> None:
    write_file(
        path,
        lambda fh: np.savez_compressed(
            fh,
            cost=m.cost,
            plan=m.plan,
            order=m.order,
            sources=np.array(m.sources),
            **{k: v for k, v in m.extra.items()},
        ),
    )


RAMP = " .:-=+*#%@"  # plain characters from dark to bright, for a terminal without colours or a pipe


def terminal_heatmap(matrix: np.ndarray, title: str, cmap: str, size: int = 32, plain: bool = False):
    """A rich renderable: the matrix downsampled to size x size cells, with a legend. Coloured
    cells on a colour terminal; with `plain`, characters whose density follows the colour's
    brightness (so a good alignment still reads as a bright diagonal when piped or logged)."""
    from rich.text import Text

    matplotlib = require_matplotlib("drawing heatmaps (--layer; --json prints the figures alone)")
    small = downsample(matrix, size)
    lo, hi = float(small.min()), float(small.max())
    colours = matplotlib.colormaps[cmap]
    scale = (hi - lo) or 1.0

    def cell(fraction: float) -> tuple[str, str]:
        r, g, b, _ = colours(fraction)
        if plain:  # relative luminance of the colour -> a character of the ramp
            brightness = 0.2126 * r + 0.7152 * g + 0.0722 * b
            return RAMP[min(len(RAMP) - 1, int(brightness * len(RAMP)))] * 2, ""
        return "  ", f"on #{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"

    text = Text(f"{title}  [{matrix.shape[0]}x{matrix.shape[1]} shown as {small.shape[0]}x{small.shape[1]}]\n")
    for row in small:
        for value in row:
            text.append(*cell((value - lo) / scale))
        text.append("\n")
    text.append("legend (low -> high): ")
    for step in range(9):
        text.append(*cell(step / 8))
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
            table.add_row(
                f"{p['pair'][0]}-{p['pair'][1]}" if g == GROUPS[0] else "", g, f"{before:.4g} -> {after:.4g}", bar
            )
    return table
