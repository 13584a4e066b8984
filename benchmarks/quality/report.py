"""Saved runs -> the study's markdown: per regime and budget a table of final held-out loss (mean,
spread) with paired differences per seed; the gaps against copy at every budget; step times per
position. Written only from what is saved, so a report can be rebuilt at any time."""

from __future__ import annotations

from .stats import PAIRED_AGAINST, Table, function_preserving_start
from .study import MAIN_ARMS, Variant

DOMAIN_TITLES = {
    "in-domain": "in-domain (CPython stdlib sources, the base's pretraining corpus)",
    "new-domain": "new domain (C/C++ headers under /usr/include)",
}


def _paired_cell(table: Table, variant: str, against: str) -> str:
    p = table.paired(variant, against)
    if p is None:
        return "—" if variant != against else "(reference)"
    per_seed = " ".join(f"{d:+.4f}" for d in p["diffs"])
    return f"{p['mean']:+.4f} ({per_seed}; {p['below']}/{p['n']} below)"


def loss_table(table: Table) -> list[str]:
    first = next(iter(table.rows.values())).runs[0]
    s = first["settings"]
    tokens = table.steps * s["batch_size"] * s["seq_len"]
    start = function_preserving_start(table)
    lines = [
        f"### {table.model}, {DOMAIN_TITLES.get(table.domain, table.domain)}: {table.steps} steps",
        "",
        (
            f"{table.steps} steps x {s['batch_size']} x {s['seq_len']} tokens = {tokens:,} tokens, training "
            f"{'only the new layers' if table.train == 'new' else 'all layers'}, lr {s['lr']:g}, "
            f"{s['warmup_steps']} warm-up steps, {s['schedule']}; held-out sample {first['eval_blocks']} blocks "
            f"x {s['seq_len']} tokens, evaluated every {s['eval_every']} steps. Seeds {sorted({sd for r in table.rows.values() for sd in r.seeds})}."
        ),
        "",
    ]
    if start:
        lines += [
            f"Base model's held-out loss (the step-0 loss of the {start['n']} function-preserving variants, "
            f"which agree to {start['spread']:.1e}): **{start['loss']:.4f}**.",
            "",
        ]
    refs = [a for a in PAIRED_AGAINST if a in table.rows]
    lines += [
        "| variant | new layers | step 0 | final mean ± std | min | max | "
        + " | ".join(f"Δ vs {a}: mean (per seed; seeds below)" for a in refs)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(refs),
    ]
    for row in table.ordered():
        f = row.final()
        layers = ",".join(map(str, row.runs[0]["variant"]["new_layers"]))
        lines.append(
            f"| {row.variant} | {layers} | {row.step0():.4f} | {f['mean']:.4f} ± {f['std']:.4f} | {f['min']:.4f} "
            f"| {f['max']:.4f} | " + " | ".join(_paired_cell(table, row.variant, a) for a in refs) + " |"
        )
    lines.append("")
    return lines


def budget_table(tables: list[Table]) -> list[str]:
    """The main arms' mean paired gap to copy at each budget of the new domain (tiny model)."""
    budgets = [
        t for t in tables if t.model == "tiny-llama" and t.domain == "new-domain" and t.evaluate and "copy" in t.rows
    ]
    if len(budgets) < 2:
        return []
    lines = [
        "### Gaps against copy as the budget grows (tiny-llama, new domain)",
        "",
        "Mean over seeds of (variant - copy) final held-out loss, min..max over seeds in brackets; "
        "the base's loss minus copy's final loss gives the scale of what training recovered.",
        "",
        "| variant | " + " | ".join(f"{t.steps} steps" for t in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    start = [function_preserving_start(t) for t in budgets]
    lines.append(
        "| (base - copy) | "
        + " | ".join(f"{s['loss'] - t.rows['copy'].final()['mean']:.4f}" if s else "—" for s, t in zip(start, budgets))
        + " |"
    )
    for arm in MAIN_ARMS[1:] + ("opt-deus-sinkhorn", "half-upper", "stack", "lesa"):
        cells = []
        for t in budgets:
            p = t.paired(arm, "copy")
            cells.append(f"{p['mean']:+.4f} [{p['min']:+.4f}..{p['max']:+.4f}]" if p else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def timing_table(tables: list[Table]) -> list[str]:
    timing = {t.train: t for t in tables if not t.evaluate}
    if "new" not in timing:
        return []
    new, full = timing["new"], timing.get("all")
    lines = [
        "### Step time per position (tiny-llama, opt-deus exact)",
        "",
        (
            f"Seconds per training step (forward + backward + AdamW, batch 8 x 128; the tool's median over each "
            f"run's steps, first step excluded), {new.steps}-step runs one at a time under the heavy-job lock, "
            "positions interleaved round by round; mean ± std over rounds."
        ),
        "",
        "| position | new layers | only new layers trained | all layers trained | new / all |",
        "|---|---|---|---|---|",
    ]
    for name, row in new.rows.items():
        t_new = row.seconds_per_step()
        t_all = full.rows[name].seconds_per_step() if full and name in full.rows else None
        layers = ",".join(map(str, row.runs[0]["variant"]["new_layers"]))
        lines.append(
            f"| {Variant.parse(name).position} | {layers} | {t_new['mean']:.3f} ± {t_new['std']:.3f} | "
            + (
                f"{t_all['mean']:.3f} ± {t_all['std']:.3f} | {t_new['mean'] / t_all['mean']:.2f} |"
                if t_all
                else "— | — |"
            )
        )
    return lines + [""]


def markdown(tables: list[Table]) -> str:
    lines = [
        "# Quality study: generated tables",
        "",
        "Generated by `python -m benchmarks.quality report` from the run files under `runs/`; "
        "losses in nats/token on a fixed held-out sample; std is the sample std over seeds; "
        "Δ is the variant's final loss minus the reference's, seed by seed (same data order).",
        "",
    ]
    problems = [p for t in tables for p in t.check_shared_data()]
    lines += [f"**Check failed:** {p}" for p in problems] + ([""] if problems else [])
    for t in tables:
        if t.evaluate:
            lines += loss_table(t)
    lines += budget_table(tables)
    lines += timing_table(tables)
    return "\n".join(lines) + "\n"
