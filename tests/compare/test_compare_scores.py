"""Which of lm-eval's numbers a comparison ranks recipes by: the scores of each task's metric list,
in the direction lm-eval gives them, as lm-eval itself reports them on the shipped local tasks;
its counts (sample_len), standard errors and aliases are not scores."""

from __future__ import annotations

import pytest

from conftest import ROOT, SHIPPED_MODEL
from opt_deus_cli.compare.report import analyse, markdown

TASKS = ("python_syntax", "python_perplexity")
EXPECTED = {
    "python_syntax/acc": True,  # examples/tasks/*.yaml metric lists
    "python_perplexity/word_perplexity": False,
    "python_perplexity/byte_perplexity": False,
    "python_perplexity/bits_per_byte": False,
}


@pytest.fixture(scope="module")
def lm_eval_output():
    """opt-deus eval of the shipped model on the two local tasks (4 documents each), and what
    compare keeps of it."""
    from opt_deus_cli.compare.tasks import flatten_scores
    from opt_deus_cli.evaluation import evaluate

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the checkout
    try:
        result = evaluate(
            [str(SHIPPED_MODEL)], list(TASKS), include_path=ROOT / "examples" / "tasks", limit=4, device="cpu"
        )
    finally:
        monkeypatch.undo()
    return result, flatten_scores(result["models"][0]["tasks"], result["tasks"])


def test_only_the_tasks_scores_are_kept_with_lm_evals_direction(lm_eval_output):
    result, (scores, higher) = lm_eval_output
    raw = {f"{task}/{name}" for task, entry in result["models"][0]["tasks"].items() for name in entry["metrics"]}
    assert {"python_syntax/sample_len", "python_perplexity/sample_len"} <= raw  # lm-eval reports more than scores
    assert higher == EXPECTED and set(scores) == set(EXPECTED)
    for name, value in scores.items():
        task, metric = name.split("/")
        assert value == result["models"][0]["tasks"][task]["metrics"][metric]


def run(recipe: str, seed: int, scores: dict, higher: dict, shift: float) -> dict:
    return {
        "recipe": recipe,
        "seed": seed,
        "model": {"new_layers": [4]},
        "start": {},
        "metrics": {
            "eval_loss": 5.0 + shift,
            **{k: v + shift for k, v in scores.items()},
            "python_syntax/sample_len": 4,
        },
        "higher_is_better": {"eval_loss": False, **higher},
        "seconds_per_step": 0.1,
        "data_sha256": ["d"],
    }


def test_the_report_tables_scores_only_and_ranks_them_by_lm_evals_direction(lm_eval_output):
    _, (scores, higher) = lm_eval_output
    runs = [run("a", s, scores, higher, 0.0) for s in (0, 1)] + [run("b", s, scores, higher, 0.1) for s in (0, 1)]
    settings = {"base": {"config_sha256": "0" * 64}, "data": [{"name": "t"}], "eval_data": [], "training": {"steps": 2}}
    comparison = {"settings": settings, "recipes": {"a": {}, "b": {}}, "seeds": [0, 1]}
    report = analyse(comparison, runs, [], "a")
    assert set(report["metrics"]) == {"eval_loss", *EXPECTED}
    assert {m: not t["lower_is_better"] for m, t in report["metrics"].items() if m != "eval_loss"} == EXPECTED
    # b is 0.1 above a in every seed: ahead on accuracy, behind on the losses and perplexities
    lines = report["recommendation"]
    assert any(line.startswith("python_syntax/acc (higher is better): b is ahead") for line in lines)
    assert any(line.startswith("python_perplexity/bits_per_byte: behind a in every seed: b") for line in lines)
    assert not any("sample_len" in line for line in lines)
    # a run saved without directions (before they were recorded) ranks by no task metric
    legacy = [{k: v for k, v in r.items() if k != "higher_is_better"} for r in runs]
    report = analyse(comparison, legacy, [], "a")
    assert set(report["metrics"]) == {"eval_loss"} and "python_syntax/sample_len" in report["not_scores"]
    assert "Not tabled (the runs record no direction for them, so they rank nothing)" in markdown(report)
