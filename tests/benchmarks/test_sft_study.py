"""The SFT study's pieces (benchmarks/sft): instruction data built offline from Python's own
documentation, split by module, with an lm-eval task over the held-out answers; and the study's
commands are `opt-deus compare` commands its parser accepts."""

from __future__ import annotations

import json
import shlex

import yaml
from typer.testing import CliRunner

from benchmarks.sft import __main__ as study
from benchmarks.sft import data
from opt_deus_cli.cli import app


def test_instruction_data_is_split_by_module_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(
        data,
        "MODULES",
        ("json", "textwrap", "shlex", "fnmatch", "heapq", "bisect", "glob", "math", "operator", "random", "datetime"),
    )
    first = data.build(tmp_path / "a")
    assert data.build(tmp_path / "b")["sha256"] == first["sha256"]  # same interpreter, same bytes
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == first["train"] > 50 and len(heldout) == first["heldout"] > 10
    for row in train + heldout:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert len(assistant["content"].split("`: ", 1)[-1]) <= data.ANSWER_CHARS  # the docstring part, cut

    # no module (or pydoc topic) on both sides: held-out questions are about unseen modules
    def group(question: str) -> str:
        name = question.split("`")[1] if "`" in question else "topic"
        return name.split(".")[0]

    held = {group(r["messages"][0]["content"]) for r in heldout} - {"topic"}
    seen = {group(r["messages"][0]["content"]) for r in train} - {"topic"}
    assert held and not held & seen
    assert any("`json.dumps(" in r["messages"][1]["content"] for r in train + heldout)  # signature + docstring


def test_the_lm_eval_task_reads_the_held_out_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MODULES", ("json", "textwrap", "math", "random", "operator", "datetime", "heapq"))
    data.HELDOUT_SHARE, share = 0.5, data.HELDOUT_SHARE
    try:
        info = data.build(tmp_path)
    finally:
        data.HELDOUT_SHARE = share
    task = yaml.safe_load((tmp_path / "pydoc_qa" / "pydoc_qa.yaml").read_text())
    assert task["output_type"] == "multiple_choice" and task["doc_to_text"] == "Question: {{question}}\nAnswer:"
    rows = [json.loads(line) for line in open(task["dataset_kwargs"]["data_files"]["test"])]
    heldout = {
        json.loads(line)["messages"][0]["content"]: json.loads(line)["messages"][1]["content"]
        for line in (tmp_path / "heldout.jsonl").read_text().splitlines()
    }
    assert len(rows) == info["multiple_choice"] > 0
    for row in rows:
        assert len(set(row["choices"])) == data.CHOICES and 0 <= row["gold"] < data.CHOICES
        doc = " ".join(heldout[row["question"]].split())
        assert row["choices"][row["gold"]].split(")")[-1].strip()[:30] in doc  # the gold is this question's answer


def test_the_study_is_opt_deus_compare_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MODULES", ("json", "textwrap", "math", "random", "operator", "datetime", "heapq"))
    data.build(tmp_path / "data")
    study.recipes(tmp_path / "recipes")
    reduced = study.commands(tmp_path, tmp_path / "results")
    full = study.commands(
        tmp_path, tmp_path / "results", study.FULL_ARMS, study.FULL_BUDGETS, 1, 8, 256, study.FULL_BUDGETS, "0,1", 6
    )
    assert [c[c.index("--steps") + 1] for c in reduced] == [str(b) for b in study.BUDGETS]
    assert [c[c.index("--steps") + 1] for c in full] == [str(b) for b in study.FULL_BUDGETS]
    # the reduced study: a stride sample of the held-out file, pydoc_qa at the larger budget only; the full
    # one: all of it and pydoc_qa at every budget
    sample = reduced[0][reduced[0].index("--eval-data") + 1]
    held = (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()
    assert open(sample).read().splitlines() == held[:: study.SAMPLE] and "--tasks" not in reduced[0]
    assert reduced[1][reduced[1].index("--tasks") + 1] == "pydoc_qa" and study.BUDGETS[1] in study.TASK_BUDGETS
    assert full[0][full[0].index("--eval-data") + 1] == str(tmp_path / "data" / "heldout.jsonl")
    assert all(c[c.index("--tasks") + 1] == "pydoc_qa" for c in full)
    assert len(full[0][full[0].index("--recipes") + 1].split(",")) == 6
    for command in reduced + full:
        assert command[1] == "compare" and command[command.index("--recipes") + 1].split(",")[0].endswith("copy.yaml")
        result = CliRunner().invoke(app, [*command[1:], "--help"])
        assert result.exit_code == 0, shlex.join(command) + "\n" + result.output
    assert yaml.safe_load((tmp_path / "recipes" / "stack.yaml").read_text()) == {"method": "stack", "overlap": 13}
