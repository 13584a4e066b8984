"""A comparison's figures (matplotlib, imported on first use, drawn off-screen):
curves.png    training loss and held-out loss against the step (mean over seeds, shaded min..max)
              and the held-out loss minus the reference's, seed by seed, where differences of
              thousandths of a nat show beside a loss that falls by whole nats;
step-time.png seconds per training step per recipe (bar: mean, dots: seeds).
`draw_band` is the one way a curve over seeds is drawn."""

from __future__ import annotations

from pathlib import Path

from .spec import atomic_path
from .stats import band, paired_band


def pyplot():
    from ..figures import pyplot as off_screen

    return off_screen("the comparison's figures")


def draw_band(ax, curve: dict, colour, label: str) -> None:
    """A mean line with its min..max over seeds shaded (curve: stats.band's dict)."""
    ax.plot(curve["steps"], curve["mean"], color=colour, lw=1.5, label=label)
    ax.fill_between(curve["steps"], curve["min"], curve["max"], color=colour, alpha=0.2, lw=0)


def run_curves(runs: list[dict], key: str) -> dict[str, dict[int, dict[int, float]]]:
    """recipe -> seed -> {step: value} of one curve of the saved runs."""
    found: dict[str, dict[int, dict[int, float]]] = {}
    for r in runs:
        points = {int(step): value for step, value in r["curves"].get(key, [])}
        if points:
            found.setdefault(r["recipe"], {})[r["seed"]] = points
    return found


def curves_figure(report: dict, runs: list[dict], path: Path) -> None:
    plt = pyplot()
    ref = report["reference"]
    panels = [("train_loss", "training loss"), ("eval_loss", "held-out loss")]
    panels = [(key, title) for key, title in panels if run_curves(runs, key)]
    evals = run_curves(runs, "eval_loss")
    columns = len(panels) + (1 if ref in evals and len(evals) > 1 else 0)
    fig, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4.2), squeeze=False)
    colours = {label: f"C{i % 10}" for i, label in enumerate(report["recipes"])}
    for ax, (key, title) in zip(axes[0], panels):
        for label, seeds in run_curves(runs, key).items():
            draw_band(ax, band(list(seeds.values())), colours[label], label)
        ax.set_title(f"{title} (mean over seeds, shaded min..max)", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if columns > len(panels):
        ax = axes[0][-1]
        for label, seeds in evals.items():
            gap = paired_band(seeds, evals[ref]) if label != ref else None
            if gap is not None:
                draw_band(ax, gap, colours[label], label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"held-out loss minus {ref}'s, seed by seed", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def step_time_figure(report: dict, path: Path) -> None:
    plt = pyplot()
    rows = report["step_time"]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.5))
    for i, (label, row) in enumerate(rows.items()):
        ax.bar(i, row["mean"], color=f"C{list(report['recipes']).index(label) % 10}", alpha=0.6)
        ax.plot([i] * len(row["per_seed"]), list(row["per_seed"].values()), "k.", ms=5)
    ax.set_xticks(range(len(rows)), list(rows), rotation=20, fontsize=8)
    ax.set_ylabel("seconds per step")
    ax.set_title("training step time (bar: mean, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figures(report: dict, runs: list[dict], out: Path) -> list[Path]:
    """The PNGs of a comparison, written into `out` (each whole or absent); returns their paths."""
    drawn = []
    if any(r["curves"].get("train_loss") or r["curves"].get("eval_loss") for r in runs):
        drawn.append((out / "curves.png", lambda path: curves_figure(report, runs, path)))
    if report["step_time"]:
        drawn.append((out / "step-time.png", lambda path: step_time_figure(report, path)))
    for path, draw in drawn:
        with atomic_path(path) as tmp:
            draw(tmp)
    return [path for path, _ in drawn]
