"""The side-by-side table of `opt-deus eval` (a row per model, a column per task and text, the
average of the higher-is-better task scores, differences against the first model) and the
training curve (score against step, a line per run) drawn from checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UsageError


def text_columns(texts: list[Path]) -> list[tuple[str, int, str]]:
    """(column name, text index, key) for each text file: token then word perplexity."""
    columns = []
    for i, text in enumerate(texts):
        for key, what in (("token_perplexity", "token ppl"), ("word_perplexity", "word ppl")):
            columns.append((f"{Path(text).name} {what}", i, key))
    return columns


def model_label(record: dict) -> str:
    """A checkpoint as run@step (the run's directory name), anything else as given."""
    if record.get("kind") == "checkpoint" and record.get("step") is not None:
        return f"{Path(record['run']).name}@{record['step']}"
    return record["spec"]


def build_table(
    records: list[dict], task_columns: list[str], task_info: dict, texts: list[tuple[str, int, str]], notes: list[str]
) -> dict:
    """{"columns", "higher_is_better", "average_of", "rows": [{"model", "scores", "average",
    "delta"}], "notes"}; delta is this row minus the first row (the reference), per column and for
    the average. The average is the mean of the higher-is-better task scores (accuracies; the
    paper's average of its seven tasks), over all of them or none."""
    average_of = [c for c in task_columns if task_info[c]["higher_is_better"]]
    columns = task_columns + [name for name, _, _ in texts]
    higher = {c: task_info[c]["higher_is_better"] for c in task_columns} | {name: False for name, _, _ in texts}
    rows = []
    for record in records:
        scores = {c: record["tasks"][c]["value"] for c in task_columns}
        scores |= {name: record["texts"][i][key] for name, i, key in texts}
        values = [scores[c] for c in average_of]
        average = sum(values) / len(values) if values and all(_number(v) for v in values) else None
        rows.append({"model": model_label(record), "scores": scores, "average": average})
    reference = rows[0] if rows else None
    for row in rows:
        row["delta"] = {c: _minus(row["scores"][c], reference["scores"][c]) for c in columns}
        row["delta_average"] = _minus(row["average"], reference["average"])
    return {
        "columns": columns,
        "higher_is_better": higher,
        "average_of": average_of,
        "rows": rows,
        "reference": reference["model"] if reference else None,
        "notes": notes,
    }


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _minus(a, b):
    return a - b if _number(a) and _number(b) else None


def _fmt(value, delta=None, reference: bool = False) -> str:
    if not _number(value):
        return "-"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    if reference or delta is None:
        return text
    return f"{text} ({delta:+.4f})" if abs(value) < 10 else f"{text} ({delta:+.2f})"


def table_cells(table: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings: each score with its difference from the reference row."""
    header = ["model", *table["columns"]] + (["average"] if table["average_of"] else [])
    rows = []
    for i, row in enumerate(table["rows"]):
        cells = [row["model"] + (" (reference)" if i == 0 and len(table["rows"]) > 1 else "")]
        cells += [_fmt(row["scores"][c], row["delta"][c], i == 0) for c in table["columns"]]
        if table["average_of"]:
            cells.append(_fmt(row["average"], row["delta_average"], i == 0))
        rows.append(cells)
    return header, rows


# ---- the training curve --------------------------------------------------------------------------


def curve_panels(results: dict) -> list[str]:
    """What the curve draws: each task column, then the average (when there is one)."""
    table = results["table"]
    return [c for c in table["columns"]] + (["average"] if table["average_of"] else [])


def check_curve(results_models: list[dict]) -> None:
    if not any(m["kind"] == "checkpoint" for m in results_models):
        raise UsageError(
            "--png draws score against training step: give training checkpoint directories "
            "(checkpoint-N, from save_strategy) among the MODELs"
        )


def save_curve(path: Path, results: dict) -> None:
    """A panel per column: a line per run through its checkpoints (score against step); every
    other model (the base, final outputs) a dashed horizontal line for comparison."""
    from ..figures import image_format, pyplot
    from ..inspect import write_file

    plt = pyplot()

    check_curve(results["models"])
    table = results["table"]
    panels = curve_panels(results)
    runs: dict[str, list[tuple[int, dict]]] = {}
    others = []
    for record, row in zip(results["models"], table["rows"]):
        if record["kind"] == "checkpoint":
            runs.setdefault(record["run"], []).append((record["step"], row))
        else:
            others.append(row)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        value = (lambda row: row["average"]) if panel == "average" else (lambda row, p=panel: row["scores"][p])
        for run, points in sorted(runs.items()):
            points.sort(key=lambda point: point[0])
            ax.plot([s for s, _ in points], [value(r) for _, r in points], marker="o", label=Path(run).name)
        for i, row in enumerate(others):
            if _number(value(row)):
                colour = f"C{(len(runs) + i) % 10}"
                ax.axhline(value(row), linestyle="--", linewidth=1, color=colour, label=row["model"])
        better = "higher" if panel == "average" or table["higher_is_better"].get(panel) else "lower"
        ax.set_title(f"{panel} ({better} is better)", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        write_file(path, lambda fh: fig.savefig(fh, format=image_format(path)))
    finally:
        plt.close(fig)
