"""A comparison's saved runs -> DIR/report.json and DIR/report.md: per metric a row per recipe
(mean over seeds and each seed's value), its difference from the reference recipe seed by seed
and how many seeds agree on the sign, the step time per recipe, the failed runs, and a
recommendation that claims only what the signs carry. Rebuilt from the files at any time."""

from __future__ import annotations

import json
from pathlib import Path

from .spec import SETTINGS_FILE, write_json_atomic, write_text_atomic
from .stats import paired, spread

FIRST_METRICS = ("eval_loss", "train_loss")  # the held-out measure first; task scores after


def load(out: Path) -> tuple[dict, list[dict], list[dict]]:
    """comparison.json, the saved runs and the failed ones (a failure later redone counts as a run)."""
    comparison = json.loads((out / SETTINGS_FILE).read_text())
    runs = [
        json.loads(p.read_text())
        for p in sorted((out / "runs").glob("*/seed*.json"))
        if not p.name.endswith(".failed.json")
    ]
    done = {(r["recipe"], r["seed"]) for r in runs}
    failed = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/seed*.failed.json"))]
    return comparison, runs, [f for f in failed if (f["recipe"], f["seed"]) not in done]


def analyse(comparison: dict, runs: list[dict], failed: list[dict], reference: str) -> dict:
    """The content of report.json."""
    labels = [label for label in comparison["recipes"] if any(r["recipe"] == label for r in runs)]
    by_recipe = {label: sorted((r for r in runs if r["recipe"] == label), key=lambda r: r["seed"]) for label in labels}
    # which way each metric is better, as the runs recorded it (task scores: lm-eval's own word);
    # a value without one (a run saved before directions were recorded) is not a score to rank by
    higher = {m: h for r in runs for m, h in r.get("higher_is_better", {}).items()} | dict.fromkeys(
        FIRST_METRICS, False
    )
    names = {m for r in runs for m in r["metrics"]}
    metrics = [m for m in FIRST_METRICS if m in names] + sorted(names & set(higher) - set(FIRST_METRICS))
    tables = {}
    for metric in metrics:
        values = {
            label: {r["seed"]: r["metrics"][metric] for r in rs if metric in r["metrics"]}
            for label, rs in by_recipe.items()
        }
        rows = {label: {"per_seed": v, **spread(list(v.values()))} for label, v in values.items() if v}
        ref = values.get(reference, {})
        tables[metric] = {
            "lower_is_better": not higher[metric],
            "rows": rows,
            "start": {
                label: rs[0]["start"].get(metric)
                for label, rs in by_recipe.items()
                if rs[0]["start"].get(metric) is not None
            },
            "paired": {label: paired(v, ref) for label, v in values.items() if label != reference and ref and v},
        }
    step_time = {
        label: {
            "per_seed": {r["seed"]: r["seconds_per_step"] for r in rs},
            **spread([r["seconds_per_step"] for r in rs]),
        }
        for label, rs in by_recipe.items()
        if all(r.get("seconds_per_step") is not None for r in rs)
    }
    hashes = {tuple(r["data_sha256"]) for r in runs}
    report = {
        "settings": comparison["settings"],
        "recipes": comparison["recipes"],
        "seeds": comparison["seeds"],
        "reference": reference,
        "models": {label: rs[0]["model"] for label, rs in by_recipe.items()},
        "metrics": tables,
        "step_time": step_time,
        "runs": len(runs),
        "failed": [{k: f.get(k) for k in ("recipe", "seed", "error", "log")} for f in failed],
        "missing": [
            [label, s]
            for label in comparison["recipes"]
            for s in comparison["seeds"]
            if not any(r["recipe"] == label and r["seed"] == s for r in runs)
        ],
        "problems": [] if len(hashes) <= 1 else [f"the runs used {len(hashes)} different sets of data files"],
        "not_scores": sorted(names - set(metrics)),
    }
    report["recommendation"] = recommendation(report)
    return report


def signed(d: float) -> str:
    """A difference with its sign and at least two significant digits (1e-5 gaps are not +0.0000)."""
    return f"{d:+.4f}" if d == 0 or abs(d) >= 1e-3 else f"{d:+.1e}"


def _fmt(p: dict) -> str:
    return f"mean Δ {signed(p['mean'])}, per seed {' '.join(signed(d) for d in p['diffs'])}"


def recommendation(report: dict) -> list[str]:
    """What the data supports, metric by metric: a recipe is ahead of (or behind) the reference
    only when every seed they share says so, with at least two seeds; otherwise not separable."""
    ref, lines = report["reference"], []
    if report["problems"]:
        lines.append("No recommendation: " + "; ".join(report["problems"]) + ".")
        return lines
    if not report["metrics"]:
        if report["runs"]:
            return ["The runs record no metric to compare (step times only): nothing to recommend."]
        return ["No completed runs: nothing to recommend."]
    primary = next(iter(report["metrics"]))
    if primary == "train_loss":
        lines.append(
            "No held-out data (--eval-data) or tasks: the comparison below is on training loss, "
            "which measures fit to the training data, not generalisation."
        )
    for metric, table in report["metrics"].items():
        if metric == "train_loss" and primary != "train_loss":
            continue  # the held-out measure decides; train loss is in the tables
        lower = table["lower_is_better"]
        pairs = {label: p for label, p in table["paired"].items() if p is not None}
        if not pairs:
            lines.append(f"{metric}: no recipe shares a seed with the reference {ref}; nothing to compare.")
            continue
        if max(p["n"] for p in pairs.values()) < 2:
            lines.append(
                f"{metric}: one shared seed per recipe: a difference cannot be told from seed noise; "
                "run at least two seeds (--seeds 0,1)."
            )
            continue
        ahead = sorted(
            (label for label, p in pairs.items() if p["consistent"] and (p["mean"] < 0) == lower),
            key=lambda label: pairs[label]["mean"] * (1 if lower else -1),
        )
        behind = [label for label, p in pairs.items() if p["consistent"] and (p["mean"] < 0) != lower]
        mixed = [label for label, p in pairs.items() if not p["consistent"]]
        word = "lower" if lower else "higher"
        if ahead:
            best, p = ahead[0], pairs[ahead[0]]
            lines.append(
                f"{metric} ({word} is better): {best} is ahead of the reference {ref} in all {p['n']} seeds "
                f"({_fmt(p)})."
            )
            rows = table["rows"]
            for other in ahead[1:]:
                q = paired(rows[best]["per_seed"], rows[other]["per_seed"])
                split = q is not None and q["consistent"]
                lines.append(
                    f"{metric}: {other} is also ahead of {ref} in every seed ({_fmt(pairs[other])}); {best} vs {other}: "
                    + (f"{best} ahead in all {q['n']} seeds." if split else "not separable (seeds disagree).")
                )
            p_values = [pairs[label]["sign_test_p"] for label in ahead]
            if min(p_values) >= 0.05:
                lines.append(
                    f"{metric}: with {p['n']} seeds, all agreeing has a chance of {min(p_values):.2g} even with no "
                    "real difference (two-sided sign test): a consistent lead, not a significant one; "
                    "more seeds would settle it."
                )
        else:
            lines.append(f"{metric}: no recipe beats the reference {ref} in every seed.")
        if behind:
            lines.append(
                f"{metric}: behind {ref} in every seed: "
                + "; ".join(f"{label} ({_fmt(pairs[label])})" for label in behind)
                + "."
            )
        if mixed:
            lines.append(
                f"{metric}: not separable from {ref} (seeds disagree on the sign): "
                + "; ".join(
                    f"{label} ({pairs[label]['agree']}/{pairs[label]['n']} agree, {_fmt(pairs[label])})"
                    for label in mixed
                )
                + "."
            )
        if not ahead and not behind:
            lines.append(f"{metric}: no recipe separable from the reference {ref}.")
    steps = report["settings"]["training"].get("steps")
    lines.append(
        f"This holds for this base, these data, {steps} steps and seeds {report['seeds']}; "
        "another budget or data set can order the recipes differently."
    )
    return lines


def markdown(report: dict) -> str:
    s, ref = report["settings"], report["reference"]
    t = s["training"]
    lines = [
        "# Comparison of up-scaling recipes",
        "",
        f"Base config sha256 {(s['base'].get('config_sha256') or 'not recorded')[:12]}; data {', '.join(d['name'] for d in s['data'])}"
        + (f"; held-out {', '.join(d['name'] for d in s['eval_data'])}" if s["eval_data"] else "; no held-out data")
        + f". {t.get('steps')} steps, training {'only the new layers' if t.get('train') == 'new' else 'all layers'}, "
        f"lr {t.get('lr') or 'default'}, batch {t.get('batch_size') or 'default'}, seq-len {t.get('seq_len') or 'default'}; "
        f"seeds {report['seeds']}; reference {ref}. Δ is a recipe's value minus the reference's, seed by seed "
        "(the seed fixes the data order for every recipe); agree: seeds sharing the majority sign.",
        "",
        "## Recommendation",
        "",
        *[f"- {line}" for line in report["recommendation"]],
        "",
    ]
    for problem in report["problems"]:
        lines += [f"**Check failed:** {problem}", ""]
    if report.get("not_scores"):
        lines += [
            "Not tabled (the runs record no direction for them, so they rank nothing): "
            + ", ".join(report["not_scores"])
            + ".",
            "",
        ]
    seeds = report["seeds"]
    for metric, table in report["metrics"].items():
        lines += [
            f"## {metric} ({'lower' if table['lower_is_better'] else 'higher'} is better)",
            "",
            "| recipe | new layers | start | mean ± std | "
            + " | ".join(f"seed {sd}" for sd in seeds)
            + f" | Δ vs {ref} (mean) | Δ per seed | seeds agree |",
            "|---|---|---|---|" + "---|" * len(seeds) + "---|---|---|",
        ]
        for label, row in table["rows"].items():
            p = table["paired"].get(label)
            start = table["start"].get(label)
            cells = [f"{row['per_seed'][sd]:.4f}" if sd in row["per_seed"] else "—" for sd in seeds]
            delta = (
                ("(reference)", "", "")
                if label == ref
                else (
                    (
                        signed(p["mean"]),
                        " ".join(signed(d) for d in p["diffs"]),
                        f"{p['agree']}/{p['n']} ({'below' if p['below'] >= p['above'] else 'above'})",
                    )
                    if p
                    else ("—", "—", "—")
                )
            )
            layers = ",".join(map(str, report["models"][label]["new_layers"]))
            lines.append(
                f"| {label} | {layers} | {'—' if start is None else f'{start:.4f}'} | {row['mean']:.4f} ± {row['std']:.4f} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(delta)
                + " |"
            )
        lines.append("")
    if report["step_time"]:
        lines += [
            "## Training step time",
            "",
            "Median seconds per optimizer step of each run (first step excluded).",
            "",
            "| recipe | mean ± std | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
            "|---|---|" + "---|" * len(seeds),
        ]
        for label, row in report["step_time"].items():
            lines.append(
                f"| {label} | {row['mean']:.4f} ± {row['std']:.4f} | "
                + " | ".join(f"{row['per_seed'][sd]:.4f}" if sd in row["per_seed"] else "—" for sd in seeds)
                + " |"
            )
        lines.append("")
    if report["failed"] or report["missing"]:
        lines += ["## Runs not in the tables", ""]
        lines += [
            f"- {f['recipe']} seed {f['seed']}: failed: {f['error']}" + (f" (log: {f['log']})" if f["log"] else "")
            for f in report["failed"]
        ]
        failed = {(f["recipe"], f["seed"]) for f in report["failed"]}
        lines += [f"- {label} seed {sd}: not run yet" for label, sd in report["missing"] if (label, sd) not in failed]
        lines.append("")
    if report.get("figures"):
        lines += ["## Figures", "", *[f"![{Path(f).stem}]({f})" for f in report["figures"]], ""]
    return "\n".join(lines)


def write_report(out: Path, reference: str | None = None) -> dict:
    """report.json, report.md and the figures of the comparison in `out`; returns the report."""
    from ..figures import PLOT_EXTRA, can_draw
    from .plot import figures

    comparison, runs, failed = load(out)
    report = analyse(comparison, runs, failed, reference or next(iter(comparison["recipes"])))
    drawable = can_draw()
    report["figures"] = [p.name for p in figures(report, runs, out)] if runs and drawable else []
    if runs and not drawable:
        report["figures_skipped"] = f"matplotlib is not installed: {PLOT_EXTRA}"
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    return report
