"""From saved runs to figures: runs grouped into tables (one regime, one training budget), each
variant's final loss over seeds, its curve, and its differences from a reference variant taken seed
by seed. A seed fixes the data order for every variant, so a per-seed difference cancels the
order's effect, which dominates the seed-to-seed spread. The statistics are `opt-deus compare`'s
(opt_deus_cli.compare.stats); this module only groups the study's runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opt_deus_cli.compare.stats import band, paired, paired_band, spread

from .study import RunSpec

PAIRED_AGAINST = ("copy", "opt-deus-exact")  # LLaMA-Pro, and the recipe the tool recommends by default


def load_runs(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]


@dataclass
class Row:
    variant: str
    runs: list[dict]  # sorted by seed

    @property
    def seeds(self) -> list[int]:
        return [r["spec"]["seed"] for r in self.runs]

    def final(self) -> dict:
        return spread([r["eval_loss"][-1] for r in self.runs])

    def step0(self) -> float:
        return self.runs[0]["eval_loss"][0]

    def seconds_per_step(self) -> dict:
        return spread([r["seconds_per_step"] for r in self.runs])

    def curves(self) -> dict[int, dict[int, float]]:
        """seed -> {eval step: held-out loss}."""
        return {r["spec"]["seed"]: dict(zip(r["eval_steps"], r["eval_loss"])) for r in self.runs}

    def curve(self) -> dict:
        """Held-out loss per eval step: mean, min and max over seeds."""
        return band(list(self.curves().values()))


@dataclass
class Table:
    """The rows of one regime (model, domain) at one budget (training mode, steps)."""

    model: str
    domain: str
    train: str
    steps: int
    evaluate: bool
    rows: dict[str, Row]

    @property
    def regime(self) -> str:
        return f"{self.model}/{self.domain}"

    def paired(self, variant: str, against: str) -> dict | None:
        """Final loss of `variant` minus `against`'s, per shared seed; None if one is missing."""
        if variant not in self.rows or against not in self.rows or variant == against:
            return None
        final = lambda row: {r["spec"]["seed"]: r["eval_loss"][-1] for r in row.runs}  # noqa: E731
        found = paired(final(self.rows[variant]), final(self.rows[against]))
        return None if found is None else {"vs": against, **found}

    def paired_curve(self, variant: str, against: str) -> dict | None:
        """Per eval step, variant minus `against` over shared seeds: mean, min, max."""
        if variant not in self.rows or against not in self.rows:
            return None
        return paired_band(self.rows[variant].curves(), self.rows[against].curves())

    def ordered(self) -> list[Row]:
        if not self.evaluate:
            return list(self.rows.values())
        return sorted(self.rows.values(), key=lambda row: row.final()["mean"])

    def check_shared_data(self) -> list[str]:
        """Problems: runs of one table must have trained and evaluated on the same files."""
        hashes = {tuple(r["data_sha256"]) for row in self.rows.values() for r in row.runs}
        return (
            []
            if len(hashes) <= 1
            else [f"{self.regime} {self.train}-{self.steps}: runs used {len(hashes)} different data files"]
        )


def tables(runs: list[dict]) -> list[Table]:
    """Runs grouped by regime and budget, rows by variant (in order of first appearance), runs by seed."""
    grouped: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        s = RunSpec(**r["spec"])
        key = (s.model, s.domain, s.train, s.steps, s.evaluate)
        grouped.setdefault(key, {}).setdefault(s.variant, []).append(r)
    out = []
    for (model, domain, train, steps, evaluate), rows in grouped.items():
        out.append(
            Table(
                model,
                domain,
                train,
                steps,
                evaluate,
                {v: Row(v, sorted(rs, key=lambda r: r["spec"]["seed"])) for v, rs in rows.items()},
            )
        )
    return sorted(out, key=lambda t: (t.model != "tiny-llama", t.model, t.domain, not t.evaluate, t.steps, t.train))


def function_preserving_start(table: Table) -> dict | None:
    """Step-0 loss of the function-preserving variants: all equal to the base model's loss."""
    starts = [row.step0() for row in table.rows.values() if row.runs[0]["variant"]["function_preserving"]]
    return {"loss": starts[0], "spread": max(starts) - min(starts), "n": len(starts)} if starts else None
