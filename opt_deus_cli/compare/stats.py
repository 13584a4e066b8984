"""The statistics of a comparison (benchmarks/quality's tables across budgets use them too): a value's
spread over seeds, and differences from a reference recipe taken seed by seed.

A seed fixes the data order (and dropout) for every recipe alike, so a per-seed difference cancels
the order's effect, which often dominates the seed-to-seed spread of each recipe on its own. How
many seeds agree on the sign of that difference is what a claim can rest on: a two-sided sign
test puts the chance of n seeds agreeing by luck at 2 * 0.5**n (2 seeds: 0.5, 5 seeds: 0.0625)."""

from __future__ import annotations

import statistics

Curve = dict[int, float]  # step -> value (one run)


def spread(xs: list[float]) -> dict:
    """mean, sample std, min, max and n of a list of per-seed values."""
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def sign_test_p(agree: int, n: int) -> float:
    """Two-sided sign test: the chance of at least `agree` of n signs alike if each were a coin flip."""
    from math import comb

    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(agree, n + 1)) / 2**n
    return min(1.0, 2 * tail) if 2 * agree != n else 1.0


def paired(values: dict[int, float], reference: dict[int, float]) -> dict | None:
    """values minus reference, seed by seed, over the seeds both have; None when they share none.

    below / above: seeds where the difference is negative / positive; agree: how many seeds share
    the sign of the majority (ties count for neither); consistent: every shared seed has the same
    strict sign and there are at least two of them."""
    seeds = sorted(s for s in values if s in reference)
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    below, above = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    agree = max(below, above)
    return {
        "seeds": seeds,
        "diffs": diffs,
        **spread(diffs),
        "below": below,
        "above": above,
        "agree": agree,
        "consistent": len(seeds) >= 2 and agree == len(seeds),
        "sign_test_p": sign_test_p(agree, len(seeds)),
    }


def band(curves: list[Curve]) -> dict:
    """Per step that every run has: mean, min and max over runs."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    columns = [[c[s] for c in curves] for s in steps]
    return {
        "steps": steps,
        "mean": [statistics.fmean(c) for c in columns],
        "min": [min(c) for c in columns],
        "max": [max(c) for c in columns],
    }


def paired_band(curves: dict[int, Curve], reference: dict[int, Curve]) -> dict | None:
    """Per step, a run's curve minus the reference run's of the same seed: mean, min, max over seeds."""
    gaps = [
        {step: v - reference[seed][step] for step, v in c.items() if step in reference[seed]}
        for seed, c in curves.items()
        if seed in reference
    ]
    gaps = [g for g in gaps if g]
    return band(gaps) if gaps else None
