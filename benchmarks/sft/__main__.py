"""The SFT regime of the quality study (issue 22, item 4), run through `opt-deus compare`.

SmolLM2-135M-Instruct (30 layers; `python -m benchmarks.smollm2` builds it offline) gets 4 new
layers at the top with each of the study's arms (copy, upper-copy, opt-deus exact = top-half's
method, opt-deus reference, average, stack; the same recipe dicts as benchmarks/quality/study.py),
and only the new layers are fine-tuned on instruction data built offline from Python's own
documentation (benchmarks/sft/data.py), 2 seeds, at each of BUDGETS steps. Measured: held-out
completion loss (eval loss on held-out modules' questions) and the offline lm-eval task pydoc_qa
(multiple choice over held-out answers), on each model as built and after training.

Each budget is one `opt-deus compare` command (printed before it runs, so it can be run by hand),
writing benchmarks/results/sft/steps-N/ (runs, report.md, report.json, PNGs); interrupted, it
resumes. Needs SFT in `opt-deus train` (TrainOptions.format) and `opt-deus eval` for --tasks.

    python -m benchmarks.sft                 # data, recipes, then both budgets (hours on 2 CPU cores)
    python -m benchmarks.sft --dry-run       # print the commands only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.quality.study import MODELS, REPO, Variant

from . import data

ARMS = ("copy", "upper-copy", "opt-deus-exact", "opt-deus-reference", "average", "stack")
REFERENCE = "copy"  # LLaMA-Pro, as in the continued pre-training tables
BUDGETS = (60, 240)
SEEDS = "0,1"
# one setting for every arm (not tuned per arm); the SFT options are opt-deus train's own flags:
# the data are conversations ({"messages": [...]}), which `--format` detects when not given
TRAIN_FLAGS = ["--lr", "2e-4", "--batch-size", "8", "--seq-len", "256", "--device", "cpu", "--dtype", "float32"]
SFT_FLAGS: list[str] = []  # e.g. ["--loss-on", "completion"] if the SFT default is not completion-only
TRAINER_ARGS = {
    "warmup_steps": 6,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "per_device_eval_batch_size": 16,
}


def recipes(work: Path, depth: int = 30) -> list[Path]:
    """The arms as recipe files (the label is the file's stem), from the quality study's definitions."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for arm in ARMS:
        path = work / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(Variant(arm).recipe(MODELS["smollm2-135m"], depth), sort_keys=False))
        paths.append(path)
    return paths


def commands(work: Path, results: Path) -> list[list[str]]:
    model = MODELS["smollm2-135m"].dir
    files = sorted(work.glob("recipes/*.yaml"), key=lambda p: ARMS.index(p.stem))
    ordered = [f for f in files if f.stem == REFERENCE] + [f for f in files if f.stem != REFERENCE]
    program = str(Path(sys.executable).parent / "opt-deus")
    return [
        [
            program,
            "compare",
            str(model),
            "--recipes",
            ",".join(map(str, ordered)),
            "--data",
            str(work / "data" / "train.jsonl"),
            "--eval-data",
            str(work / "data" / "heldout.jsonl"),
            "--tasks",
            "pydoc_qa",
            "--include-path",
            str(work / "data" / "pydoc_qa"),
            "--steps",
            str(steps),
            "--seeds",
            SEEDS,
            "--eval-every",
            str(max(1, steps // 6)),
            "--args",
            str(work / "trainer.yaml"),
            *TRAIN_FLAGS,
            *SFT_FLAGS,
            "--out",
            str(results / f"steps-{steps}"),
        ]
        for steps in BUDGETS
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=REPO / "bench-out" / "sft", help="data, recipes (git-ignored)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "sft")
    p.add_argument("--dry-run", action="store_true", help="build data and recipes, print the commands, run nothing")
    args = p.parse_args(argv)
    if not MODELS["smollm2-135m"].dir.is_dir() and not args.dry_run:
        sys.exit(f"no {MODELS['smollm2-135m'].dir}: build it first with `python -m benchmarks.smollm2`")
    info = data.build(args.work / "data")
    print(
        f"data: {info['train']} training and {info['heldout']} held-out conversations, {info['multiple_choice']} "
        f"pydoc_qa questions (Python {info['python']})",
        flush=True,
    )
    recipes(args.work / "recipes")
    (args.work / "trainer.yaml").write_text(yaml.safe_dump(TRAINER_ARGS))
    code = 0
    for command in commands(args.work, args.results):
        print("$ " + shlex.join(command), flush=True)
        if not args.dry_run:
            code = max(code, subprocess.run(command).returncode)
    return code


if __name__ == "__main__":
    sys.exit(main())
