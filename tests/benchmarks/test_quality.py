"""The quality study through `opt-deus compare`: its parts and budgets, the corpora, a part run by
compare (two seeds side by side on one comparison), the runs of 2026-11-25 migrated into
compare's layout (every value kept), and BENCHMARKS.md's tables checked against compare's
reports of them."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.quality import data, migrate, summary
from benchmarks.quality.run import Places, comparison_dirs, run_part, saved_runs
from benchmarks.quality.study import ALL_ARMS, MODELS, PARTS, REPO, Budget, Comparison, Part, Variant, train_options
from opt_deus_cli.compare.stats import paired
from opt_deus_cli.layers import recipe_layers
from opt_deus_cli.recipe import parse_recipe

RESULTS = REPO / "benchmarks" / "results" / "quality"

# ---- what the parts run ----------------------------------------------------------------------


def test_parts_cover_the_issue_and_share_runs():
    runs = [run for part in PARTS.values() for run in part.runs]
    assert all(len(set(p.runs)) == len(p.runs) for p in PARTS.values())  # no run twice within a part
    methods = PARTS["methods-60"].runs
    assert {(name.split("/")[1], v) for name, v, _ in methods} == {
        (d, a) for d in ("in-domain", "new-domain") for a in ALL_ARMS
    }
    assert {s for *_, s in methods} == {0, 1, 2} and {name.rsplit("-", 1)[1] for name, *_ in methods} == {"60"}
    # opt-deus exact at the top, 600 steps, is one run in two parts: both add recipes to one comparison
    shared = set(PARTS["budget-600"].runs) & set(PARTS["positions-600"].runs)
    assert {v for _, v, _ in shared} == {"opt-deus-exact"} and len(set(runs)) == len(runs) - len(shared)
    assert {c.budget for c in PARTS["budget-600"].comparisons} == {c.budget for c in PARTS["positions-600"].comparisons}
    alphas = {Variant.parse(v).alpha for _, v, _ in PARTS["alpha-150"].runs if v.startswith("opt-deus-exact")}
    assert alphas == {0.0, 0.25, None, 0.75, 1.0}  # None: the arm's own 0.5


@pytest.mark.parametrize("model,depth,new", [("tiny-llama", 8, 4), ("smollm2-135m", 30, 4)])
def test_every_variant_is_a_valid_recipe_adding_the_same_depth(model, depth, new):
    names = list(ALL_ARMS) + ["opt-deus-exact@bottom", "opt-deus-exact@top-bottom", "opt-deus-exact-alpha0.25"]
    for name in names:
        v = Variant.parse(name)
        assert v.name == name
        layers = recipe_layers(parse_recipe(v.recipe(MODELS[model], depth), name), depth)
        assert sum(layer.is_new for layer in layers) == new and len(layers) == depth + new, name
    assert Variant.parse("opt-deus-exact-alpha0.25").recipe(MODELS["tiny-llama"], 8)["fusion"] == {"alpha": 0.25}


def test_options_depend_on_the_regime_and_budget_not_the_arm():
    options = train_options(Budget("tiny-llama", "new-domain", 600), REPO / "eval.jsonl")
    assert options.eval_every == 50 and options.lr == 5e-4 and options.trainer_args["warmup_steps"] == 60
    assert options.trainer_args["eval_on_start"] and options.eval_data == (REPO / "eval.jsonl",)
    assert train_options(Budget("tiny-llama", "in-domain", 60), None).lr == 2e-4
    timing = train_options(Budget("tiny-llama", "new-domain", 30, evaluate=False), REPO / "eval.jsonl")
    assert timing.eval_data == () and timing.eval_every is None and "eval_on_start" not in timing.trainer_args
    assert Budget("tiny-llama", "new-domain", 30, "all", False).name == "tiny-llama/new-domain/all-30-timing"
    assert Comparison(Budget("tiny-llama", "new-domain", 60), ("opt-deus-exact", "copy"), (0,)).reference == "copy"


# ---- corpora ---------------------------------------------------------------------------------


def test_windows_are_whole_lines_from_the_middle_covering_the_text():
    text = "".join(f"line {i:03d} " + "x" * (i % 7) + "\n" for i in range(200))
    pieces = data.windows(text, 100)
    assert pieces[0].startswith("line 100 ")  # the middle first, not the header
    assert sorted("".join(pieces).splitlines()) == sorted(text.splitlines())  # every line exactly once
    assert all(p.endswith("\n") and len(p) <= 100 for p in pieces)
    assert data.windows("one very long line " * 20, 30) == ["one very long line " * 20]


def test_eval_sample_spans_files_first_and_stops_at_its_size():
    heldout = [(f"f{i}.h", "".join(f"{i}:{j}\n" for j in range(2000))) for i in range(5)]

    def count(text: str) -> int:
        return len(text.split())

    docs = data.eval_documents(heldout, count, 3000)
    firsts = {d.split(":", 1)[0] for d in docs[:5]}
    assert firsts == {"0", "1", "2", "3", "4"}  # one piece of every file before a second piece of any
    assert sum(map(count, docs)) >= 3000 > sum(map(count, docs[:-1]))
    with pytest.raises(SystemExit, match="holds only"):
        data.eval_documents(heldout, count, 10**6)


def test_headers_are_listed_once_per_content_without_symlinks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.h").write_text("int x;\n")
    (tmp_path / "a" / "y.h").write_text("int x;\n")  # same bytes: would leak across the split
    (tmp_path / "z.h").write_text("int z;\n")
    (tmp_path / "notes.txt").write_text("not a header\n")
    (tmp_path / "link.h").symlink_to(tmp_path / "z.h")
    assert data.header_paths(tmp_path) == ["a/x.h", "z.h"]


# ---- a part through opt-deus compare ---------------------------------------------------------


@pytest.mark.slow
def test_a_part_runs_through_compare_two_seeds_side_by_side(tmp_path):
    places = Places(results=tmp_path / "results", work=tmp_path / "work", max_corpus_bytes=120_000, eval_tokens=512)
    part = Part("t", "test", (Comparison(Budget("tiny-llama", "in-domain", 2), ("copy", "upper-copy"), (0, 1)),))
    run_part(part, places, workers=2)  # two processes, one seed each, on one comparison directory
    [out] = comparison_dirs(places.results)
    assert out == places.results / "tiny-llama" / "in-domain" / "new-2" and saved_runs(part, places) == 4
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1]
    runs = {
        (r["recipe"], r["seed"]): r for r in map(json.loads, map(lambda p: p.read_text(), out.glob("runs/*/*.json")))
    }
    assert set(runs) == {(v, s) for v in ("copy", "upper-copy") for s in (0, 1)}
    for r in runs.values():
        assert [step for step, _ in r["curves"]["eval_loss"]] == [0, 1, 2] and r["status"] == "ok"
    assert runs[("copy", 0)]["start"] == runs[("upper-copy", 1)]["start"]  # both start as the base
    assert sorted(p.name for p in (out / "models").iterdir()) == ["copy", "upper-copy"]  # each built once, no leftovers
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "copy" and report["metrics"]["eval_loss"]["paired"]["upper-copy"]["n"] == 2
    assert not (out / "work").exists() and not list(out.glob(".*"))


# ---- the runs of 2026-11-25, migrated ----------------------------------------------------------


def committed_runs():
    return sorted(RESULTS.glob("*/*/*/runs/*/seed*.json"))


def test_the_migrated_runs_keep_every_value_and_say_when_they_were_measured():
    paths = committed_runs()
    assert len(paths) == 133
    for path in paths:
        run = json.loads(path.read_text())
        old = migrate.original(run)
        assert migrate.migrate_run(old, run["migrated"]["from"]) == run  # nothing lost either way
        assert run["migrated"]["note"].startswith("measured on 2026-11-25 by the pre-compare runner")
        assert run["finished"].startswith("2026-11-25") and path.parent.name == old["spec"]["variant"]
        migrate.check_settings(old, migrate.budget_of(old))  # what the new path gives the budget
    for out in comparison_dirs(RESULTS):
        comparison = json.loads((out / "comparison.json").read_text())
        assert set(comparison["recipes"]) == {p.name for p in (out / "runs").iterdir()}


def benchmarks_rows() -> dict[str, list[list[str]]]:
    """BENCHMARKS.md's quality tables: budget heading -> rows of cells."""
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text[text.index("### Tables (generated from the saved runs)") : text.index("### Figures")]
    tables, heading = {}, None
    for line in section.splitlines():
        if line.startswith("#### "):
            heading = line[5:]
            tables[heading] = []
        elif heading and line.startswith("| ") and not line.startswith("| variant"):
            tables[heading].append([c.strip() for c in line.strip("|").split("|")])
    return tables


BUDGETS = {  # BENCHMARKS.md's heading -> the comparison directory
    "tiny-llama, in-domain (CPython stdlib sources, the base's pretraining corpus): 60 steps": "tiny-llama/in-domain/new-60",
    "tiny-llama, new domain (C/C++ headers under /usr/include): 60 steps": "tiny-llama/new-domain/new-60",
    "tiny-llama, new domain (C/C++ headers under /usr/include): 150 steps": "tiny-llama/new-domain/new-150",
    "tiny-llama, new domain (C/C++ headers under /usr/include): 600 steps": "tiny-llama/new-domain/new-600",
    "smollm2-135m, new domain (C/C++ headers under /usr/include): 90 steps": "smollm2-135m/new-domain/new-90",
}


def gap(p: dict | None) -> str:
    if p is None:
        return "(reference)"
    return f"{p['mean']:+.4f} ({' '.join(f'{d:+.4f}' for d in p['diffs'])}; {p['below']}/{p['n']} below)"


def test_benchmarks_tables_are_compares_reports_of_the_migrated_runs():
    """Every number of BENCHMARKS.md's quality tables, from compare's report.json of each budget
    (differences against opt-deus-exact: compare's paired(), as its report pairs against copy)."""
    found = benchmarks_rows()
    assert set(BUDGETS) <= set(found)
    for heading, name in BUDGETS.items():
        t = json.loads((RESULTS / name / "report.json").read_text())["metrics"]["eval_loss"]
        rows = t["rows"]
        expected = []
        for label, row in sorted(rows.items(), key=lambda item: (item[1]["mean"], item[0])):  # ties: by name
            per_seed = {int(s): v for s, v in row["per_seed"].items()}
            exact = {int(s): v for s, v in rows["opt-deus-exact"]["per_seed"].items()}
            layers = json.loads((RESULTS / name / "report.json").read_text())["models"][label]["new_layers"]
            expected.append(
                [
                    label,
                    ",".join(map(str, layers)),
                    f"{t['start'][label]:.4f}",
                    f"{row['mean']:.4f} ± {row['std']:.4f}",
                    f"{row['min']:.4f}",
                    f"{row['max']:.4f}",
                    gap(t["paired"].get(label)),
                    gap(paired(per_seed, exact) if label != "opt-deus-exact" else None),
                ]
            )
        assert found[heading] == expected, heading
    # the tables across budgets: summary.md's, line for line
    text = (REPO / "BENCHMARKS.md").read_text()
    lines = summary.budget_table(summary.reports(RESULTS)) + summary.timing_table(summary.reports(RESULTS))
    table_rows = [line for line in lines if line.startswith("| ")]
    assert len(table_rows) == 10 + 5 and all(line in text for line in table_rows)


def test_the_report_command_rebuilds_compares_reports(tmp_path):
    import shutil

    from benchmarks.quality.__main__ import main as quality_main

    results = tmp_path / "results"
    shutil.copytree(RESULTS / "tiny-llama" / "new-domain" / "new-60", results / "tiny-llama" / "new-domain" / "new-60")
    for name in ("report.md", "report.json", "curves.png", "step-time.png"):
        (results / "tiny-llama" / "new-domain" / "new-60" / name).unlink()
    assert quality_main(["report", "--results", str(results)]) == 0
    out = results / "tiny-llama" / "new-domain" / "new-60"
    assert (out / "report.md").read_text() == (
        RESULTS / "tiny-llama" / "new-domain" / "new-60" / "report.md"
    ).read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "[tiny-llama/new-domain/new-60](tiny-llama/new-domain/new-60/report.md)" in (results / "summary.md").read_text()
    )
    assert re.search(r"reference copy", (out / "report.md").read_text())
