"""`opt-deus eval`: score models on lm-evaluation-harness tasks (and local texts) side by side.

    from opt_deus_cli.evaluation import evaluate
    results = evaluate(["examples/tiny-llama", "out/demo"], ["python_syntax"], include_path="examples/tasks")
    results["table"]["rows"]   # [{"model", "scores", "average", "delta", "delta_average"}, ...]

models.py resolves MODEL arguments, tasks.py the task names (the paper's suite), run.py scores
(through lm_eval.simple_evaluate), table.py lays out the table and draws the training curve.
Importing this package loads neither torch nor lm_eval."""

from __future__ import annotations

from .run import evaluate

__all__ = ["evaluate"]
