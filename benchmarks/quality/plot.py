"""One figure per regime (base model x domain): a column per training budget; the top row is the
held-out loss against the step (mean over seeds, shaded min..max), the bottom row the paired
difference from copy (LLaMA-Pro) at every eval step, where differences of thousandths of a nat
are visible next to a loss that falls by whole nats."""

from __future__ import annotations

from pathlib import Path

from .stats import Table
from .study import ALL_ARMS

REFERENCE = "copy"


def colour_of(variant: str, taken: dict[str, str]) -> str:
    """The same colour for an arm in every figure; other variants (alphas, positions) take the next free ones."""
    if variant not in taken:
        fixed = {arm: f"C{i}" for i, arm in enumerate(ALL_ARMS)}  # 9 arms: C0..C8
        free = [c for c in ("C9", "#555555", "#b8860b", "#2e8b57", "#8a2be2", "#dc143c", "#00ced1") if c not in taken.values()]
        taken[variant] = fixed.get(variant) or (free[0] if free else "k")
    return taken[variant]


def regime_figure(tables: list[Table], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [t for t in tables if t.evaluate]
    fig, axes = plt.subplots(2, len(tables), figsize=(5.8 * len(tables), 8), squeeze=False, sharex="col")
    colours: dict[str, str] = {}
    for col, table in enumerate(tables):
        loss_ax, gap_ax = axes[0][col], axes[1][col]
        for row in table.ordered():
            hue = colour_of(row.variant, colours)
            c = row.curve()
            loss_ax.plot(c["steps"], c["mean"], color=hue, lw=1.5, label=row.variant)
            loss_ax.fill_between(c["steps"], c["min"], c["max"], color=hue, alpha=0.2, lw=0)
            gap = table.paired_curve(row.variant, REFERENCE)
            if gap is not None and row.variant != REFERENCE:
                gap_ax.plot(gap["steps"], gap["mean"], color=hue, lw=1.5, label=row.variant)
                gap_ax.fill_between(gap["steps"], gap["min"], gap["max"], color=hue, alpha=0.2, lw=0)
        # the curves fall fast at first: show the second half, where the variants separate
        tail = [v for row in table.rows.values() for v in row.curve()["max"][len(row.curve()["max"]) // 3:]]
        low = min(v for row in table.rows.values() for v in row.curve()["min"])
        loss_ax.set_ylim(low - 0.05 * (max(tail) - low) - 1e-4, max(tail) + 0.05 * (max(tail) - low) + 1e-4)
        loss_ax.set_title(f"{table.steps} steps, {'new layers' if table.train == 'new' else 'all layers'} trained", fontsize=10)
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(fontsize=7)
        gap_ax.axhline(0, color="k", lw=0.8)
        gap_ax.set_xlabel("training step")
        gap_ax.grid(alpha=0.3)
        if REFERENCE in table.rows:
            gap_ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats/token; y clipped)")
    axes[1][0].set_ylabel(f"paired Δ vs {REFERENCE} (nats/token)")
    seeds = sorted({s for t in tables for row in t.rows.values() for s in row.seeds})
    fig.suptitle(f"{tables[0].model}, {tables[0].domain}: mean over seeds {seeds}, shaded min..max", fontsize=11)
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
