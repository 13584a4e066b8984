"""One figure per regime (base model x domain): a column per training budget (and one for the
positions, when a budget has them); the top row is the held-out loss against the step (mean over
seeds, shaded min..max), the bottom row the paired difference from a reference variant at every
eval step (copy, LLaMA-Pro; for positions, opt-deus exact at the top), where differences of
thousandths of a nat are visible next to a loss that falls by whole nats."""

from __future__ import annotations

from pathlib import Path

from opt_deus_cli.compare.plot import draw_band, pyplot

from .stats import Row, Table
from .study import ALL_ARMS, Variant

POSITION_COLOURS = {"top": "C3", "bottom": "k", "middle": "#17becf", "top-bottom": "#e377c2"}


def colour_of(variant: str) -> str:
    """An arm has one colour in every figure; fusion weights run along a colour map (0: yellow,
    1: purple; 0.5 is the arm's own colour); positions have their own."""
    v = Variant.parse(variant)
    if v.alpha is not None:
        import matplotlib

        return matplotlib.colormaps["viridis"](1 - v.alpha)
    if v.position != "top":
        return POSITION_COLOURS[v.position]
    return f"C{ALL_ARMS.index(v.arm) % 10}"


def panels(table: Table) -> list[tuple[str, list[Row], str]]:
    """(title, rows, reference) of each column one table needs."""
    budget = f"{table.steps} steps, {'new layers' if table.train == 'new' else 'all layers'} trained"
    arms = [r for r in table.ordered() if Variant.parse(r.variant).position == "top"]
    placed = [
        r
        for r in table.ordered()
        if Variant.parse(r.variant).arm == "opt-deus-exact" and Variant.parse(r.variant).alpha is None
    ]
    out = [(budget, arms, "copy")]
    if any(Variant.parse(r.variant).position != "top" for r in placed):
        out.append((f"{budget}: opt-deus exact by position", placed, "opt-deus-exact"))
    return out


def regime_figure(tables: list[Table], path: Path) -> None:
    plt = pyplot()
    columns = [(t, *panel) for t in tables if t.evaluate for panel in panels(t)]
    fig, axes = plt.subplots(2, len(columns), figsize=(5.8 * len(columns), 8), squeeze=False, sharex="col")
    for col, (table, title, rows, reference) in enumerate(columns):
        loss_ax, gap_ax = axes[0][col], axes[1][col]
        for row in rows:
            hue = colour_of(row.variant)
            draw_band(loss_ax, row.curve(), hue, row.variant)
            gap = table.paired_curve(row.variant, reference)
            if gap is not None and row.variant != reference:
                draw_band(gap_ax, gap, hue, row.variant)
        # the curves fall fast at first: show the last two thirds, where the variants separate
        tail = [v for row in rows for v in row.curve()["max"][len(row.curve()["max"]) // 3 :]]
        low = min(v for row in rows for v in row.curve()["min"])
        loss_ax.set_ylim(low - 0.05 * (max(tail) - low) - 1e-4, max(tail) + 0.05 * (max(tail) - low) + 1e-4)
        loss_ax.set_title(title, fontsize=10)
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(fontsize=7)
        gap_ax.axhline(0, color="k", lw=0.8)
        gap_ax.set_xlabel("training step")
        gap_ax.set_ylabel(f"paired Δ vs {reference} (nats/token)", fontsize=9)
        gap_ax.grid(alpha=0.3)
        if reference in table.rows and len(rows) > 1:
            gap_ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats/token; y clipped)")
    seeds = sorted({s for t, *_ in columns for row in t.rows.values() for s in row.seeds})
    sep = ", " if len(columns) > 1 else "\n"  # one panel is too narrow for the title on one line
    fig.suptitle(
        f"{columns[0][0].model}, {columns[0][0].domain}: mean over seeds {seeds}{sep}shaded min..max "
        "(identical curves overlap)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figures(tables: list[Table], out: Path) -> list[Path]:
    """One PNG per regime; returns the paths written."""
    regimes = dict.fromkeys(t.regime for t in tables if t.evaluate)
    paths = []
    for regime in regimes:
        path = out / f"{regime.replace('/', '-')}.png"
        regime_figure([t for t in tables if t.regime == regime], path)
        paths.append(path)
    return paths
