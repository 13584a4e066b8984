"""`opt-deus eval` on lm-evaluation-harness, offline: local YAML tasks (tests/fixtures/eval_tasks: a
multiple-choice task and a perplexity task) scored on the shipped model agree with a computation
made here with the model itself; a function-preserving up-scaled model scores what its base
scores; --text perplexity is verify's and the model's own loss; the table's deltas and average;
training checkpoints drawn against their step; bad input is one line and exit 2."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from opt_deus_cli.cli import app
from opt_deus_cli.evaluation import evaluate
from opt_deus_cli.evaluation.table import build_table, table_cells

SHIPPED = ROOT / "examples" / "tiny-llama"
TASKS = ROOT / "tests" / "fixtures" / "eval_tasks"
MC_TASK, PPL_TASK = "syntax_mc", "code_ppl"


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path_factory, monkeypatch):
    """The task YAMLs name their jsonl relative to the repository root (datasets' rule); datasets
    caches what it reads in a temporary directory, not the user's cache."""
    import datasets

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of the log-probabilities of the choice's tokens after the context: the context's tokens
    are a prefix of the whole's (the BOS the tokenizer adds included), the rest are the choice's."""
    whole = tokenizer(context + choice)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))


def expected_accuracy(model_dir: Path) -> float:
    model, tokenizer = load(model_dir)
    docs = rows(TASKS / f"{MC_TASK}.jsonl")
    right = 0
    for doc in docs:
        scores = [choice_logprob(model, tokenizer, doc["context"], c) for c in doc["choices"]]
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(docs)


def expected_word_perplexity(model_dir: Path) -> float:
    """exp(summed NLL / words) over the documents, each scored whole after the tokenizer's BOS as
    the first context token (the harness's rolling-window prefix); the NLL is the model's own
    loss times the number of predicted tokens; words as the harness counts them (split on \\s+)."""
    model, tokenizer = load(model_dir)
    nll, words = 0.0, 0
    for doc in rows(TASKS / f"{PPL_TASK}.jsonl"):
        ids = [tokenizer.bos_token_id] + tokenizer(doc["text"])["input_ids"]
        assert len(ids) <= model.config.max_position_embeddings  # one window: no rolling
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        nll += loss * (len(ids) - 1)
        words += len(re.split(r"\s+", doc["text"]))
    return math.exp(nll / words)


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory) -> Path:
    """The shipped model made deeper by a function-preserving recipe (new layers' o/down zeroed)."""
    out = tmp_path_factory.mktemp("upscaled") / "demo"
    result = CliRunner().invoke(app, ["upscale", str(SHIPPED), "--recipe", "top-half", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(SHIPPED.joinpath("heldout.txt").read_text()[:800])
    return path


@pytest.fixture(scope="module")
def scored(upscaled, short_text, tmp_path_factory):
    import datasets

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("datasets-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        try:
            return evaluate(
                [str(SHIPPED), str(upscaled)],
                [MC_TASK, PPL_TASK],
                include_path=TASKS,
                texts=[short_text],
                device="cpu",
                dtype="float32",
            )
        finally:
            datasets.config.HF_DATASETS_CACHE = previous


@pytest.mark.slow
def test_accuracy_is_the_choice_tokens_log_likelihood(scored):
    base = scored["models"][0]["tasks"][MC_TASK]
    assert base["metric"] == "acc"
    assert base["value"] == pytest.approx(expected_accuracy(SHIPPED), abs=1e-12)
    assert scored["tasks"][MC_TASK]["samples"] == len(rows(TASKS / f"{MC_TASK}.jsonl"))
    assert scored["tasks"][MC_TASK]["higher_is_better"] is True


@pytest.mark.slow
def test_word_perplexity_is_the_models_own_loss(scored):
    base = scored["models"][0]["tasks"][PPL_TASK]
    assert base["metric"] == "word_perplexity"
    assert base["value"] == pytest.approx(expected_word_perplexity(SHIPPED), rel=1e-5)
    assert scored["tasks"][PPL_TASK]["higher_is_better"] is False


@pytest.mark.slow
def test_text_perplexity_is_verifys_and_the_models_loss(scored, upscaled, short_text):
    from opt_deus_cli.verify import verify

    measured = scored["models"][0]["texts"][0]
    model, tokenizer = load(SHIPPED)
    ids = tokenizer(short_text.read_text())["input_ids"]
    assert len(ids) - 1 <= 256  # one window
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert measured["tokens"] == len(ids) - 1
    assert measured["token_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert measured["word_perplexity"] == pytest.approx(
        math.exp(loss * (len(ids) - 1) / len(short_text.read_text().split())), rel=1e-5
    )
    report = verify(SHIPPED, upscaled, torch.device("cpu"), short_text)
    assert report["perplexity"]["base"] == pytest.approx(measured["token_perplexity"], rel=1e-6)
    assert report["word_perplexity"]["output"] == pytest.approx(
        scored["models"][1]["texts"][0]["word_perplexity"], rel=1e-6
    )


@pytest.mark.slow
def test_function_preserving_upscale_scores_what_its_base_scores(scored):
    base, deeper = scored["models"]
    assert (base["num_layers"], deeper["num_layers"]) == (8, 12)
    assert deeper["tasks"][MC_TASK]["value"] == base["tasks"][MC_TASK]["value"]
    assert deeper["tasks"][PPL_TASK]["value"] == pytest.approx(base["tasks"][PPL_TASK]["value"], rel=1e-5)
    assert deeper["texts"][0]["token_perplexity"] == pytest.approx(base["texts"][0]["token_perplexity"], rel=1e-5)
    row = scored["table"]["rows"][1]
    assert row["delta"][MC_TASK] == 0 and row["delta_average"] == 0
    assert abs(row["delta"][PPL_TASK]) <= 1e-5 * base["tasks"][PPL_TASK]["value"]


@pytest.mark.slow
def test_results_record_what_ran(scored, upscaled):
    from opt_deus_cli.manifest import read_manifest

    base, deeper = scored["models"]
    assert deeper["kind"] == "output" and deeper["sha256_from"] == "manifest"
    recorded = {f.name: f.sha256 for f in read_manifest(upscaled).output.files}
    assert {f["name"]: f["sha256"] for f in deeper["files"]} == {
        n: h for n, h in recorded.items() if n.endswith(".safetensors")
    }
    from opt_deus_cli.checkpoint import sha256_file

    assert base["files"] == [
        {
            "name": "model.safetensors",
            "bytes": (SHIPPED / "model.safetensors").stat().st_size,
            "sha256": sha256_file(SHIPPED / "model.safetensors"),
        }
    ]
    assert scored["versions"]["lm_eval"] == __import__("importlib.metadata").metadata.version("lm_eval")
    assert scored["tasks"][MC_TASK]["version"] == 1.0 and scored["tasks"][MC_TASK]["num_fewshot"] == 0
    json.dumps(scored, allow_nan=False)


def record(spec, scores: dict, texts=()) -> dict:
    return {
        "spec": spec,
        "kind": "model",
        "tasks": {t: {"value": v} for t, v in scores.items()},
        "texts": [{"token_perplexity": a, "word_perplexity": b} for a, b in texts],
    }


def test_table_average_and_deltas_against_the_first_model():
    info = {"a": {"higher_is_better": True}, "b": {"higher_is_better": True}, "ppl": {"higher_is_better": False}}
    records = [
        record("base", {"a": 0.5, "b": 0.25, "ppl": 20.0}, [(3.0, 9.0)]),
        record("deeper", {"a": 0.75, "b": 0.5, "ppl": 18.0}, [(2.5, 7.0)]),
    ]
    table = build_table(records, ["a", "b", "ppl"], info, [("t word ppl", 0, "word_perplexity")], [])
    assert table["average_of"] == ["a", "b"]  # perplexities are not averaged with accuracies
    base, deeper = table["rows"]
    assert base["average"] == pytest.approx(0.375) and deeper["average"] == pytest.approx(0.625)
    assert deeper["delta"] == pytest.approx({"a": 0.25, "b": 0.25, "ppl": -2.0, "t word ppl": -2.0})
    assert deeper["delta_average"] == pytest.approx(0.25) and base["delta_average"] == 0
    header, cells = table_cells(table)
    assert header == ["model", "a", "b", "ppl", "t word ppl", "average"]
    assert cells[0][0] == "base (reference)" and cells[1][1] == "0.7500 (+0.2500)" and cells[1][3] == "18.00 (-2.00)"


@pytest.mark.slow
def test_checkpoints_of_a_run_draw_the_curve_and_results_are_written(upscaled, short_text, tmp_path):
    args = tmp_path / "args.yaml"
    args.write_text(f"save_strategy: steps\nsave_steps: 1\noutput_dir: {tmp_path / 'run'}\n")
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            str(upscaled),
            "--data",
            str(short_text),
            "--out",
            str(tmp_path / "trained"),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--args",
            str(args),
        ],
    )
    assert trained.exit_code == 0, trained.output
    checkpoints = [tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"]
    assert all(c.is_dir() for c in checkpoints)
    before = {p: p.stat().st_mtime_ns for c in checkpoints for p in c.iterdir()}
    png, results_file = tmp_path / "curve.png", tmp_path / "results.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(upscaled),
            *map(str, checkpoints),
            "--tasks",
            MC_TASK,
            "--include-path",
            str(TASKS),
            "--text",
            str(short_text),
            "--limit",
            "4",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--png",
            str(png),
            "--out",
            str(results_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(results_file.read_text())
    steps = [(m["kind"], m["step"]) for m in results["models"]]
    assert steps == [("output", None), ("checkpoint", 1), ("checkpoint", 2)]
    assert [r["model"] for r in results["table"]["rows"]][1:] == ["run@1", "run@2"]
    assert "no tokenizer of its own" in " ".join(results["notes"])  # the Trainer saved none
    assert results["settings"]["limit"] == 4 and results["tasks"][MC_TASK]["samples"] == 4
    assert {p: p.stat().st_mtime_ns for c in checkpoints for p in c.iterdir()} == before  # inputs untouched
    assert "run@2" in result.output and "(reference)" in result.output


@pytest.mark.slow
def test_different_tokenizers_are_allowed_and_noted(short_text, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(SHIPPED, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-200]  # same vocabulary, fewer merges
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(SHIPPED),
            str(other),
            "--text",
            str(short_text),
            "--json",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert any("use a tokenizer other than the reference" in n and str(other) in n for n in results["notes"])
    base, changed = (m["texts"][0] for m in results["models"])
    assert changed["tokens"] > base["tokens"] and changed["words"] == base["words"]


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    return result, lines


def test_checkpoint_without_weights_is_one_line_and_nothing_written(short_text, tmp_path):
    empty = tmp_path / "run" / "checkpoint-3"
    empty.mkdir(parents=True)
    (empty / "config.json").write_text((SHIPPED / "config.json").read_text())
    (empty / "trainer_state.json").write_text('{"global_step": 3}')
    out = tmp_path / "results.json"
    result, errors = run_cli(["eval", str(SHIPPED), str(empty), "--text", str(short_text), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "checkpoint-3 has no weights" in errors[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_unknown_task_names_the_closest():
    """Checked against lm-eval's TaskManager (here over the local YAMLs alone: indexing lm-eval's own
    thousands of tasks takes minutes on a loaded machine; `--tasks arc_eay` names arc_easy first)."""
    from opt_deus_cli.errors import UsageError
    from opt_deus_cli.evaluation.tasks import check_names, task_manager

    manager = task_manager(TASKS, [MC_TASK, PPL_TASK])
    assert set(manager.all_tasks) == {MC_TASK, PPL_TASK}
    check_names([MC_TASK, PPL_TASK], manager)
    with pytest.raises(UsageError, match=r"unknown task 'syntax_mcq' .*closest: syntax_mc") as raised:
        check_names([MC_TASK, "syntax_mcq"], manager)
    assert raised.value.exit_code == 2 and "\n" not in str(raised.value)


def test_uncached_dataset_while_offline_is_one_line(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # a Hub dataset that is not in the (empty) cache; offline, so datasets may not fetch it
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: opt-deus-tests/not-cached\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
    )
    result, errors = run_cli(["eval", str(SHIPPED), "--tasks", "hub_task", "--include-path", str(tasks)])
    assert result.exit_code == 2, result.output
    assert len(errors) == 1, result.output
    assert "opt-deus-tests/not-cached" in errors[0] and "HF_DATASETS_OFFLINE" in errors[0]


def test_paper_suite_is_zero_shot_and_alone():
    from opt_deus_cli.evaluation.tasks import PAPER_TASKS, select_tasks

    paper = select_tasks("paper")
    assert paper.names == [*PAPER_TASKS, "wikitext"] and paper.num_fewshot == 0 and paper.suite == "paper"
    assert set(PAPER_TASKS) == {"logiqa", "piqa", "winogrande", "arc_easy", "mmlu", "commonsense_qa", "boolq"}
    result, errors = run_cli(["eval", str(SHIPPED), "--tasks", "paper", "--num-fewshot", "5"])
    assert result.exit_code == 2 and "zero-shot" in errors[0]


def test_png_needs_checkpoints(short_text, tmp_path):
    result, errors = run_cli(["eval", str(SHIPPED), "--text", str(short_text), "--png", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "checkpoint" in errors[0]
    assert not (tmp_path / "c.png").exists()
