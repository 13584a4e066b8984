"""The quality study's pieces (benchmarks/quality): what the parts run, the corpora's split and
held-out sample, a run through the tool saved and resumed, and the statistics of the report."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.quality import data, runner, stats
from benchmarks.quality.__main__ import main as quality_main
from benchmarks.quality.report import markdown
from benchmarks.quality.study import ALL_ARMS, MODELS, PARTS, RunSpec, Variant, training_settings
from opt_deus_cli.layers import recipe_layers
from opt_deus_cli.recipe import parse_recipe

# ---- what the parts run ----------------------------------------------------------------------


def test_parts_cover_the_issue_and_share_runs():
    keys = [s.key for part in PARTS.values() for s in part.runs]
    per_part = {name: {s.key for s in part.runs} for name, part in PARTS.items()}
    assert all(len(per_part[n]) == len(PARTS[n].runs) for n in PARTS)  # no run twice within a part
    methods = PARTS["methods-60"].runs
    assert {(s.domain, s.variant) for s in methods} == {(d, a) for d in ("in-domain", "new-domain") for a in ALL_ARMS}
    assert {s.seed for s in methods} == {0, 1, 2} and {s.steps for s in methods} == {60}
    # opt-deus exact at the top, 600 steps, is one run in two parts
    shared = per_part["budget-600"] & per_part["positions-600"]
    assert {s.variant for s in PARTS["budget-600"].runs if s.key in shared} == {"opt-deus-exact"}
    assert len(set(keys)) == len(keys) - len(shared)
    alphas = {Variant.parse(s.variant).alpha for s in PARTS["alpha-150"].runs if s.variant.startswith("opt-deus-exact")}
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


def test_settings_depend_on_the_regime_and_budget_not_the_arm():
    a, b = RunSpec("tiny-llama", "new-domain", "copy", 600, 0), RunSpec("tiny-llama", "new-domain", "average", 600, 2)
    assert training_settings(a) == training_settings(b) and training_settings(a)["eval_every"] == 50
    assert training_settings(RunSpec("tiny-llama", "in-domain", "copy", 60, 0))["lr"] == 2e-4
    assert a.key != b.key and a.key.endswith("new-600/copy/seed0.json")


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


# ---- a run through the tool, saved and resumed -------------------------------------------------


def test_runs_are_saved_one_file_each_and_resumed(tmp_path, monkeypatch):
    places = runner.Places(
        results=tmp_path / "results", work=tmp_path / "work", max_corpus_bytes=120_000, eval_tokens=512
    )
    specs = [RunSpec("tiny-llama", "in-domain", v, 3, 0) for v in ("copy", "upper-copy")]
    first = runner.run_specs(specs, places, workers=1)
    for spec in specs:
        saved = json.loads((places.results / spec.key).read_text())
        assert saved["eval_steps"] == [0, 1, 2, 3] and len(saved["eval_loss"]) == 4
        assert saved["spec"] == vars(spec) and saved["settings"] == training_settings(spec)
        assert saved["variant"]["function_preserving"] and saved["variant"]["recipe"]["method"] == "copy"
        assert saved["trainable_parameters"] < saved["total_parameters"]  # only the new layers trained
    assert first[0]["eval_loss"][0] == first[1]["eval_loss"][0]  # both start as the base model
    assert first[0]["data_sha256"] == first[1]["data_sha256"]

    def must_not_train(job):
        raise AssertionError(f"trained again: {job['spec']}")

    monkeypatch.setattr(runner, "run_one", must_not_train)
    assert runner.run_specs(specs, places, workers=1) == first  # resumed from the files
    stale = json.loads((places.results / specs[0].key).read_text())
    stale["settings"]["lr"] = 1.0  # a run made with other settings is not this run
    (places.results / specs[0].key).write_text(json.dumps(stale))
    with pytest.raises(AssertionError, match="trained again"):
        runner.run_specs(specs, places, workers=1)


# ---- statistics, report, figures -------------------------------------------------------------


def fake_run(variant: str, seed: int, curve: list[float], steps: int = 60, domain: str = "new-domain") -> dict:
    spec = RunSpec("tiny-llama", domain, variant, steps, seed)
    return {
        "spec": vars(spec),
        "settings": training_settings(spec),
        "eval_steps": [0, 20, 40, 60][: len(curve)],
        "eval_loss": curve,
        "seconds_per_step": 0.5 + seed,
        "eval_blocks": 128,
        "data_sha256": ["a", "b"],
        "variant": {"new_layers": [4, 6, 8, 10], "function_preserving": variant != "average"},
    }


def fake_runs() -> list[dict]:
    runs = []
    for seed, order_effect in enumerate((0.0, 0.3, -0.2)):  # the data order moves every arm alike
        runs.append(fake_run("copy", seed, [6.5, 6.0, 5.5, 5.0 + order_effect]))
        runs.append(fake_run("opt-deus-exact", seed, [6.5, 6.0, 5.5, 5.0 + order_effect + 0.01 * (seed + 1)]))
        runs.append(fake_run("average", seed, [6.4, 5.9, 5.4, 4.9 + order_effect]))
    return runs


def test_paired_differences_cancel_the_data_order():
    [table] = stats.tables(fake_runs())
    finals = [r["eval_loss"][-1] for r in table.rows["opt-deus-exact"].runs]
    assert table.rows["opt-deus-exact"].final()["std"] == pytest.approx(statistics.stdev(finals))
    p = table.paired("opt-deus-exact", "copy")
    assert p["diffs"] == pytest.approx([0.01, 0.02, 0.03]) and p["below"] == 0  # spread 0.25 apart, gaps exact
    assert (
        table.paired("average", "copy")["mean"] == pytest.approx(-0.1) and table.paired("average", "copy")["below"] == 3
    )
    assert table.paired("copy", "copy") is None
    assert [row.variant for row in table.ordered()] == ["average", "copy", "opt-deus-exact"]
    gap = table.paired_curve("opt-deus-exact", "copy")
    assert gap["steps"] == [0, 20, 40, 60] and gap["mean"][:3] == [0, 0, 0] and gap["max"][-1] == pytest.approx(0.03)
    assert stats.function_preserving_start(table) == {"loss": 6.5, "spread": 0.0, "n": 2}
    assert table.check_shared_data() == []


def test_report_and_figures_from_saved_runs(tmp_path):
    runs = fake_runs() + [
        fake_run(v, s, [6.5, 5.0 + 0.001 * s], steps=600) for v in ("copy", "upper-copy") for s in (0, 1)
    ]
    runs[0]["data_sha256"] = ["other"]
    for r in runs:
        path = tmp_path / RunSpec(**r["spec"]).key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    text = markdown(stats.tables(stats.load_runs(tmp_path)))
    assert "| opt-deus-exact | 4,6,8,10 | 6.5000 | 5.0533 ± 0.2479 |" in text
    assert "+0.0200 (+0.0100 +0.0200 +0.0300; 0/3 below)" in text
    assert "Check failed" in text  # runs of one table that used other data files are flagged
    assert "| upper-copy | " in text and "600 steps |" in text  # the budget table
    assert quality_main(["report", "--results", str(tmp_path)]) == 0
    png = tmp_path / "tiny-llama-new-domain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "report.md").read_text() == text
