"""`opt-deus compare`: a two-recipe, two-seed comparison on the shipped model, its resume, its
refusals, a failing launcher, and the statistics and recommendation of its report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from opt_deus_cli.cli import app
from opt_deus_cli.compare import stats
from opt_deus_cli.compare.report import analyse, markdown, signed
from opt_deus_cli.compare.runner import train_flags
from opt_deus_cli.compare.spec import with_train_fields
from opt_deus_cli.training import TrainOptions

TINY = ROOT / "examples" / "tiny-llama"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Training and held-out files cut from the shipped model's held-out text."""
    where = tmp_path_factory.mktemp("corpus")
    text = (TINY / "heldout.txt").read_text()
    (where / "train.txt").write_text(text[:8000])
    (where / "eval.txt").write_text(text[-3000:])
    return where / "train.txt", where / "eval.txt"


def compare_args(
    corpus, out: Path, *extra: str, recipes: str = "llama-pro,upper-copy", seeds: str = "0,1"
) -> list[str]:
    train, heldout = corpus
    return [
        "compare",
        str(TINY),
        "--recipes",
        recipes,
        "--data",
        str(train),
        "--eval-data",
        str(heldout),
        "--steps",
        "2",
        "--seeds",
        seeds,
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--eval-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def saved_runs(out: Path) -> dict[tuple[str, int], dict]:
    return {
        (r["recipe"], r["seed"]): r for r in (json.loads(p.read_text()) for p in (out / "runs").glob("*/seed?.json"))
    }


@pytest.mark.slow
def test_two_recipes_two_seeds_report_resume_and_refusals(corpus, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    result = invoke(compare_args(corpus, out))
    assert result.exit_code == 0, result.output
    runs = saved_runs(out)
    assert set(runs) == {(r, s) for r in ("llama-pro", "upper-copy") for s in (0, 1)}
    for r in runs.values():
        assert [step for step, _ in r["curves"]["eval_loss"]] == [0, 1, 2]  # step 0: the model as built
        assert r["trainable_parameters"] < r["total_parameters"]  # only the new layers trained
        assert r["model"]["function_preserving"] and r["metrics"]["eval_loss"] == r["curves"]["eval_loss"][-1][1]
    # both recipes start as the base: the same held-out loss at step 0 in every run
    starts = {r["start"]["eval_loss"] for r in runs.values()}
    assert max(starts) - min(starts) < 1e-5
    assert runs[("llama-pro", 0)]["model"]["new_layers"] != runs[("upper-copy", 0)]["model"]["new_layers"]

    report = json.loads((out / "report.json").read_text())
    table = report["metrics"]["eval_loss"]
    p = table["paired"]["upper-copy"]
    diffs = [
        runs[("upper-copy", s)]["metrics"]["eval_loss"] - runs[("llama-pro", s)]["metrics"]["eval_loss"] for s in (0, 1)
    ]
    assert p["seeds"] == [0, 1] and p["diffs"] == pytest.approx(diffs)
    assert p["below"] == sum(d < 0 for d in diffs) and p["agree"] == max(p["below"], p["above"])
    assert table["rows"]["upper-copy"]["mean"] == pytest.approx(
        sum(runs[("upper-copy", s)]["metrics"]["eval_loss"] for s in (0, 1)) / 2
    )
    assert set(report["step_time"]) == {"llama-pro", "upper-copy"} and report["reference"] == "llama-pro"
    text = (out / "report.md").read_text()
    assert "## eval_loss (lower is better)" in text and "| upper-copy |" in text and "## Recommendation" in text
    assert f"{signed(diffs[0])} {signed(diffs[1])}" in text
    for png in ("curves.png", "step-time.png"):
        assert (out / png).read_bytes()[:8] == PNG

    # resume: a comparison interrupted before its last run completes it, and only it
    (out / "runs" / "upper-copy" / "seed1.json").unlink()
    kept = {p: p.read_text() for p in (out / "runs").glob("*/seed?.json")}
    import opt_deus_cli.training.run as training_run

    real_train, trained = training_run.train, []

    def counting_train(model_dir, data, out_dir, options, *a, **kw):
        trained.append((Path(model_dir).name, options.seed))
        return real_train(model_dir, data, out_dir, options, *a, **kw)

    monkeypatch.setattr(training_run, "train", counting_train)
    result = invoke(compare_args(corpus, out))
    assert result.exit_code == 0, result.output
    assert trained == [("upper-copy", 1)]
    assert all(p.read_text() == text for p, text in kept.items())  # saved runs untouched
    redone = saved_runs(out)[("upper-copy", 1)]
    curve = lambda run: [loss for _, loss in run["curves"]["eval_loss"]]  # noqa: E731
    assert curve(redone) == pytest.approx(curve(runs[("upper-copy", 1)]))  # deterministic for a seed
    assert "3 of 4 runs already saved" in result.output

    # another comparison's settings in the same --out are refused, naming the setting
    result = invoke(compare_args(corpus, out, "--lr", "0.01"))
    assert result.exit_code == 2 and "training.lr" in result.output and "another comparison" in result.output
    assert trained == [("upper-copy", 1)]
    changed = tmp_path / "llama-pro.yaml"
    changed.write_text("method: copy\npositions: top\ncount: 2\nzero_init: [o_proj, down_proj]\n")
    result = invoke(compare_args(corpus, out, recipes=f"{changed},upper-copy"))
    assert result.exit_code == 2 and "recipe llama-pro" in result.output
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1]  # refusals change nothing


@pytest.mark.slow
def test_a_failing_launcher_marks_its_run_failed_and_the_others_go_on(corpus, tmp_path):
    """The launcher runs `opt-deus train` in a subprocess; this one fails for upper-copy only."""
    launcher = tmp_path / "launch.sh"
    launcher.write_text('#!/bin/sh\ncase "$*" in *upper-copy*) echo "no GPU for you" >&2; exit 3;; esac\nexec "$@"\n')
    launcher.chmod(0o755)
    out = tmp_path / "cmp"
    result = invoke(compare_args(corpus, out, "--launcher", str(launcher), seeds="0"))
    assert result.exit_code == 1, result.output
    ok = json.loads((out / "runs" / "llama-pro" / "seed0.json").read_text())
    assert ok["status"] == "ok" and ok["launcher"] == str(launcher) and len(ok["curves"]["eval_loss"]) == 3
    failed = json.loads((out / "runs" / "upper-copy" / "seed0.failed.json").read_text())
    assert failed["status"] == "failed" and "code 3" in failed["error"] and "no GPU for you" in failed["error"]
    log = (out / failed["log"]).read_text()
    assert log.startswith(f"$ {launcher} ") and " train " in log and "--seed 0" in log
    text = (out / "report.md").read_text()
    assert "upper-copy seed 0: failed" in text and not (out / "runs" / "upper-copy" / "seed0.json").exists()
    # `false` as the launcher: every run fails, the exit code says so
    result = invoke(compare_args(corpus, tmp_path / "cmp2", "--launcher", "false", seeds="0"))
    assert result.exit_code == 1 and len(list((tmp_path / "cmp2" / "runs").glob("*/*.failed.json"))) == 2


def test_a_recipe_that_does_not_fit_is_named_before_anything_runs(corpus, tmp_path):
    out = tmp_path / "cmp"
    result = invoke(compare_args(corpus, out, recipes="upper-copy,top8"))  # top8 needs 9 base layers; tiny has 8
    assert result.exit_code == 2 and "recipe top8 does not fit" in result.output
    assert not out.exists()
    result = invoke(compare_args(corpus, out, "--reference", "solar"))
    assert result.exit_code == 2 and "--reference solar is not one of" in result.output
    result = invoke(compare_args(corpus, out, "--launcher", "no-such-launcher-program"))
    assert result.exit_code == 2 and "no program 'no-such-launcher-program'" in result.output and not out.exists()


def test_an_out_holding_something_else_is_refused(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke(compare_args(corpus, tmp_path))
    assert result.exit_code == 2 and "holds no comparison" in result.output


def test_sft_options_reach_train_options():
    options = with_train_fields(TrainOptions(), {"format": "chat", "loss_on": "all", "packing": True, "seed": None})
    assert (options.format, options.loss_on, options.packing, options.seed) == (
        "chat",
        "all",
        True,
        TrainOptions().seed,
    )


def test_an_unknown_task_is_refused_before_anything_runs(corpus, tmp_path):
    result = invoke(
        compare_args(
            corpus, tmp_path / "cmp", "--tasks", "python_syntx", "--include-path", str(ROOT / "examples" / "tasks")
        )
    )
    assert result.exit_code == 2 and "unknown task 'python_syntx'" in result.output
    assert not (tmp_path / "cmp").exists()


def test_task_scores_are_read_from_opt_deus_evals_task_block():
    """opt-deus eval's per-model tasks (lm-eval's metric names, "metric,filter" for other filters,
    standard errors and counts beside) and lm-eval's direction per metric of each task."""
    from opt_deus_cli.compare.tasks import flatten_scores

    tasks = {
        "arc_easy": {
            "metrics": {"alias": "arc_easy", "acc": 0.25, "acc_stderr": 0.04, "acc_norm": 0.5, "sample_len": 8}
        },
        "gsm8k": {"metrics": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01}},
        "wikitext": {"metrics": {"word_perplexity": 40.0, "bits_per_byte": 1.1, "alias": "wikitext"}},
    }
    info = {
        "arc_easy": {"metrics_higher_is_better": {"acc": True, "acc_norm": True}},
        "gsm8k": {"metrics_higher_is_better": {"exact_match": True}},
        "wikitext": {"metrics_higher_is_better": {"word_perplexity": False, "bits_per_byte": False}},
    }
    scores, higher = flatten_scores(tasks, info)
    assert scores == {
        "arc_easy/acc": 0.25,
        "arc_easy/acc_norm": 0.5,
        "gsm8k/exact_match,strict-match": 0.1,
        "wikitext/word_perplexity": 40.0,
        "wikitext/bits_per_byte": 1.1,
    }
    assert [higher[m] for m in scores] == [True, True, True, False, False]


def test_train_flags_are_opt_deus_train_options(tmp_path):
    """The launcher path spells TrainOptions as `opt-deus train` flags; train's own parser accepts them."""
    options = TrainOptions(
        train="all",
        steps=3,
        lr=0.1,
        batch_size=2,
        grad_accum=2,
        seq_len=32,
        device="cpu",
        dtype="bfloat16",
        seed=4,
        eval_data=(Path("a.txt"), Path("b.txt")),
        eval_every=1,
        text_field="body",
        cache_dir=tmp_path,
        overwrite=True,
        shard_size="1GB",
        trainer_args={"warmup_steps": 1},
    )
    flags = train_flags(options, tmp_path / "args.yaml")
    assert flags.count("--eval-data") == 2 and "--seq-len" in flags and "--overwrite" in flags
    assert flags[flags.index("--args") + 1] == str(tmp_path / "args.yaml")
    result = invoke(["train", "m", "--data", "d.txt", "--out", "o", *flags, "--help"])
    assert result.exit_code == 0, result.output


# ---- statistics and recommendation -------------------------------------------------------------


def fake_run(recipe: str, seed: int, loss: float, start: float = 6.0) -> dict:
    return {
        "recipe": recipe,
        "seed": seed,
        "status": "ok",
        "metrics": {"eval_loss": loss, "train_loss": loss + 0.5},
        "start": {"eval_loss": start},
        "curves": {"eval_loss": [[0, start], [10, loss]], "train_loss": [[1, 7.0], [10, loss]]},
        "seconds_per_step": 0.1 + 0.01 * seed,
        "data_sha256": ["x"],
        "model": {"new_layers": [6, 7], "function_preserving": True},
    }


def comparison(recipes, seeds) -> dict:
    return {
        "settings": {
            "training": {"steps": 10, "train": "new"},
            "data": [{"name": "d.txt"}],
            "eval_data": [],
            "base": {"config_sha256": "0" * 64},
        },
        "recipes": {r: {"method": "copy"} for r in recipes},
        "seeds": list(seeds),
    }


def test_paired_differences_and_sign_agreement():
    p = stats.paired({0: 5.0, 1: 5.3, 2: 4.8, 3: 9.0}, {0: 5.1, 1: 5.2, 2: 4.9})
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == pytest.approx([-0.1, 0.1, -0.1])
    assert (p["below"], p["above"], p["agree"], p["consistent"]) == (2, 1, 2, False)
    q = stats.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert q["consistent"] and q["mean"] == pytest.approx(-0.5) and q["sign_test_p"] == pytest.approx(0.5)
    assert stats.sign_test_p(5, 5) == pytest.approx(0.0625) and stats.sign_test_p(1, 2) == 1.0
    assert stats.paired({0: 1.0}, {1: 1.0}) is None
    assert (signed(-2e-5), signed(0.01234), signed(0.0)) == (
        "-2.0e-05",
        "+0.0123",
        "+0.0000",
    )  # tiny gaps keep their digits
    gap = stats.paired_band({0: {0: 1.0, 5: 2.0}, 1: {0: 1.0, 5: 3.0}}, {0: {0: 1.0, 5: 1.5}, 1: {0: 1.0, 5: 2.0}})
    assert gap["steps"] == [0, 5] and gap["mean"] == pytest.approx([0.0, 0.75]) and gap["max"][1] == pytest.approx(1.0)


def test_seeds_that_disagree_make_no_recipe_separable():
    # the data order moves every recipe alike (+-0.3), and b's gap to a flips sign between seeds
    runs = [
        fake_run("a", 0, 5.0),
        fake_run("b", 0, 4.99),
        fake_run("a", 1, 5.3),
        fake_run("b", 1, 5.31),
        fake_run("a", 2, 4.7),
        fake_run("b", 2, 4.69),
    ]
    report = analyse(comparison("ab", (0, 1, 2)), runs, [], "a")
    p = report["metrics"]["eval_loss"]["paired"]["b"]
    assert p["diffs"] == pytest.approx([-0.01, 0.01, -0.01]) and p["agree"] == 2 and not p["consistent"]
    text = " ".join(report["recommendation"])
    assert "no recipe separable from the reference a" in text and "not separable from a" in text
    assert "ahead of the reference" not in text
    assert (
        "| b | 6,7 | 6.0000 | 4.9967 ± 0.3101 | 4.9900 | 5.3100 | 4.6900 | -0.0033 | -0.0100 +0.0100 -0.0100 | 2/3 (below) |"
        in markdown(report)
    )


def test_a_recipe_ahead_in_every_seed_is_named_with_its_evidence():
    runs = [
        fake_run(r, s, 5.0 + order + gap)
        for s, order in enumerate((0.0, 0.3, -0.2))
        for r, gap in (("a", 0.0), ("b", -0.02 * (1 + s)), ("c", 0.01))
    ]
    report = analyse(
        comparison("abc", (0, 1, 2)), runs, [{"recipe": "c", "seed": 3, "error": "boom", "log": None}], "a"
    )
    lines = report["recommendation"]
    assert lines[0].startswith(
        "eval_loss (lower is better): b is ahead of the reference a in all 3 seeds (mean Δ -0.0400"
    )
    assert any("sign test" in line and "0.25" in line for line in lines)  # 3 seeds: p = 0.25, said so
    assert any(line.startswith("eval_loss: behind a in every seed: c") for line in lines)
    assert "c seed 3: failed: boom" in markdown(report)
    one_seed = analyse(comparison("ab", (0,)), runs[:2], [], "a")
    assert "one shared seed" in one_seed["recommendation"][0]


def test_a_changed_data_set_is_flagged_not_recommended():
    runs = [fake_run("a", 0, 5.0), fake_run("b", 0, 4.9), fake_run("a", 1, 5.0), fake_run("b", 1, 4.9)]
    runs[0]["data_sha256"] = ["y"]
    report = analyse(comparison("ab", (0, 1)), runs, [], "a")
    assert report["recommendation"][0].startswith("No recommendation") and "Check failed" in markdown(report)
    assert re.search(r"different sets of data files", report["problems"][0])
