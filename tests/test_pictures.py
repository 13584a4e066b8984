"""`inspect --png` pictures a newcomer can read (issue 23, item 12), checked on the figures
themselves: the matched costs shown against the unmatched ones, integer ticks, the units named
(heads, neurons), every colour map running dark = low to bright = high, upright readable labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opt_deus_cli import inspect as ins
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


@pytest.fixture(scope="module")
def matrices():
    return {g: ins.pair_matrices(SHIPPED, (4, 5), g, AlignmentSettings(), "cpu", layer=6) for g in ins.GROUPS}


@pytest.mark.parametrize("group,units", [("attention", "query heads"), ("mlp", "neurons")])
def test_layer_figure_names_units_ticks_and_colours(matrices, group, units):
    import matplotlib

    m = matrices[group]
    fig = ins.layer_figure(m, "t")
    heatmaps, hist = fig.axes[:3], fig.axes[3]  # the four panels, then the colour bars
    for ax in heatmaps:
        assert ax.get_xlabel() == f"{units} of base layer 5 (B)" and ax.get_ylabel() == f"{units} of base layer 4 (A)"
        ticks = [t for t in ax.get_xticks() if -0.5 <= t <= m.cost.shape[1] - 0.5]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        cmap = ax.images[0].get_cmap()
        assert cmap(0.0)[:3] != cmap(1.0)[:3]
        luminance = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b, _ in (cmap(0.0), cmap(1.0))]
        assert luminance[0] < luminance[1], cmap.name  # low values dark, in every panel
        assert ax.xaxis.get_ticklabels()[0].get_fontsize() >= 9
    assert isinstance(heatmaps[0].images[0].get_cmap(), matplotlib.colors.Colormap)
    # the fourth panel: matched pairs cost less than the unmatched ones, and the means are drawn
    assert hist.get_title().startswith("cost of matched vs unmatched pairs")
    means = sorted(line.get_xdata()[0] for line in hist.lines)
    assert np.allclose(means, sorted([m.matched_costs.mean(), m.unmatched_costs.mean()]))
    assert m.matched_costs.mean() < m.unmatched_costs.mean()
    assert m.matched_costs.size == m.cost.shape[0] and m.unmatched_costs.size == m.cost.size - m.cost.shape[0]


def test_cost_figure_labels_are_upright_while_they_fit():
    few = ins.cost_figure(
        [f"{k}-{k + 1}" for k in range(7)], {g: ([1.0] * 7, [0.5] * 7) for g in ins.GROUPS}, "x", "pair"
    )
    many = ins.cost_figure(
        [f"{k}-{k + 1}" for k in range(31)], {g: ([1.0] * 31, [0.5] * 31) for g in ins.GROUPS}, "x", "pair"
    )
    for fig, rotation in ((few, 0), (many, 45)):
        for ax in fig.axes:
            labels = ax.get_xticklabels()
            assert labels and all(t.get_rotation() == rotation and t.get_fontsize() >= 9 for t in labels)
