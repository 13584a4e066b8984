"""The study's tables that span comparisons, read from compare's report.json of each: the main
arms' paired gap to copy as the budget grows (tiny-llama, new domain), and the step time per
position with only the new layers or all layers trained. Everything else (per budget: the table
per recipe, paired differences, recommendation, curves) is compare's own report.md."""

from __future__ import annotations

import json
from pathlib import Path

from .study import MAIN_ARMS, Variant

OTHER_ARMS = ("opt-deus-sinkhorn", "half-upper", "stack", "lesa")


def reports(results: Path) -> dict[str, dict]:
    """comparison directory (model/domain/kind) -> its report.json."""
    return {
        p.parent.relative_to(results).as_posix(): json.loads(p.read_text())
        for p in sorted(results.glob("*/*/*/report.json"))
    }


def budget_table(found: dict[str, dict]) -> list[str]:
    budgets = sorted(
        (int(name.rsplit("-", 1)[1]), r["metrics"]["eval_loss"])
        for name, r in found.items()
        if name.startswith("tiny-llama/new-domain/new-") and "eval_loss" in r["metrics"] and r["reference"] == "copy"
    )
    if len(budgets) < 2:
        return []
    lines = [
        "## Gaps against copy as the budget grows (tiny-llama, new domain)",
        "",
        "Mean over seeds of (variant - copy) final held-out loss, min..max over seeds in brackets; "
        "the base's loss minus copy's final loss gives the scale of what training recovered.",
        "",
        "| variant | " + " | ".join(f"{steps} steps" for steps, _ in budgets) + " |",
        "|---|" + "---|" * len(budgets),
        "| (base - copy) | "
        + " | ".join(f"{t['start']['copy'] - t['rows']['copy']['mean']:.4f}" for _, t in budgets)
        + " |",
    ]
    for arm in MAIN_ARMS[1:] + OTHER_ARMS:
        cells = [
            f"{p['mean']:+.4f} [{p['min']:+.4f}..{p['max']:+.4f}]" if (p := t["paired"].get(arm)) else "—"
            for _, t in budgets
        ]
        if any(c != "—" for c in cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def timing_table(found: dict[str, dict]) -> list[str]:
    new = next((r for name, r in found.items() if name.endswith("/new-30-timing")), None)
    full = next((r for name, r in found.items() if name.endswith("/all-30-timing")), None)
    if new is None:
        return []
    lines = [
        "## Step time per position (tiny-llama, opt-deus exact)",
        "",
        "Seconds per training step (forward + backward + AdamW, batch 8 x 128; the tool's median over each "
        "run's steps, first step excluded), 30-step runs one at a time; mean ± std over seeds.",
        "",
        "| position | new layers | only new layers trained | all layers trained | new / all |",
        "|---|---|---|---|---|",
    ]
    for name, t_new in new["step_time"].items():
        t_all = full["step_time"].get(name) if full else None
        layers = ",".join(map(str, new["models"][name]["new_layers"]))
        lines.append(
            f"| {Variant.parse(name).position} | {layers} | {t_new['mean']:.3f} ± {t_new['std']:.3f} | "
            + (
                f"{t_all['mean']:.3f} ± {t_all['std']:.3f} | {t_new['mean'] / t_all['mean']:.2f} |"
                if t_all
                else "— | — |"
            )
        )
    return lines + [""]


def markdown(results: Path) -> str:
    found = reports(results)
    lines = [
        "# Quality study: the tables across comparisons",
        "",
        "Each budget is one `opt-deus compare` comparison with its own report (tables per recipe, "
        "paired differences against copy, recommendation, curves): "
        + ", ".join(f"[{name}]({name}/report.md)" for name in found)
        + ".",
        "",
    ]
    return "\n".join(lines + budget_table(found) + timing_table(found))
