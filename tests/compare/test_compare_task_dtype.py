"""`opt-deus compare --tasks` scores each model in the comparison's --dtype (float32 by default), the
dtype its held-out loss is computed in, not in the stored one (SmolLM2 as built by
benchmarks/smollm2.py is a bf16 checkpoint, whose bf16 matmuls are slow on CPUs without bf16 units).
Under the load of the SFT study's session lm-eval took 13-30 s per request either way, so no speed
figure is claimed for the change."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from opt_deus_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny-llama"


def captured_task_options(monkeypatch, tmp_path, *extra: str) -> dict:
    """The task options compare hands its runner (the runner and report replaced: nothing trains)."""
    import opt_deus_cli.compare.report as report
    import opt_deus_cli.compare.runner as runner

    seen = {}

    def fake_run(spec, out, say, progress):
        seen["task_options"] = spec.task_options
        return {"runs": [], "failed": [], "skipped": 0, "ran": 0}

    monkeypatch.setattr(runner, "run_comparison", fake_run)
    monkeypatch.setattr(report, "write_report", lambda out, ref=None: {"recommendation": [], "figures": []})
    text = tmp_path / "train.txt"
    text.write_text((TINY / "heldout.txt").read_text()[:2000])
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(TINY),
            "--recipes",
            "llama-pro,upper-copy",
            "--data",
            str(text),
            "--steps",
            "1",
            "--seeds",
            "0,1",
            "--out",
            str(tmp_path / "cmp"),
            "--tasks",
            "pydoc_qa",
            "--include-path",
            str(tmp_path),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return seen["task_options"]


def test_tasks_are_scored_in_the_training_dtype(monkeypatch, tmp_path):
    assert captured_task_options(monkeypatch, tmp_path)["dtype"] == "float32"  # compare's default --dtype
    assert captured_task_options(monkeypatch, tmp_path, "--dtype", "keep")["dtype"] == "keep"


def test_the_dtype_reaches_opt_deus_eval(monkeypatch, tmp_path):
    import opt_deus_cli.evaluation as evaluation
    from opt_deus_cli.compare.tasks import task_scores

    calls = []

    def fake_evaluate(models, tasks, **options):
        calls.append(options)
        return {
            "models": [{"tasks": {"pydoc_qa": {"metrics": {"acc": 0.5}}}}],
            "tasks": {"pydoc_qa": {"metrics_higher_is_better": {"acc": True}}},
        }

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    options = captured_task_options(monkeypatch, tmp_path, "--dtype", "bfloat16")
    assert task_scores(TINY, ("pydoc_qa",), options) == ({"pydoc_qa/acc": 0.5}, {"pydoc_qa/acc": True})
    assert calls[0]["dtype"] == "bfloat16"
