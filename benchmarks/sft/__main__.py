"""The SFT regime of the quality study (issue 22, item 4), run through `opt-deus compare`.

SmolLM2-135M-Instruct (30 layers; `python -m benchmarks.smollm2` builds it offline) gets 4 new
layers at the top with each of the study's arms (copy, upper-copy, opt-deus exact = top-half's
method, opt-deus reference, average, stack; the same recipe dicts as benchmarks/quality/study.py),
and only the new layers are fine-tuned on instruction data built offline from Python's own
documentation (benchmarks/sft/data.py), 2 seeds, at each of BUDGETS steps. Measured: held-out
completion loss (eval loss on held-out modules' questions) and the offline lm-eval task pydoc_qa
(multiple choice over held-out answers), on each model as built and after training.

The defaults are the reduced study that was run on a 2-core machine (BENCHMARKS.md): all six
arms, BUDGETS steps of batch 4 x 128, the held-out loss on every SAMPLE-th held-out conversation
(spread over all held-out modules) at step 0 and at the end, and pydoc_qa on every SAMPLE-th
question at the TASK_BUDGETS (`--task` adds it to every budget). `--full` is the study as first defined:
all six arms, FULL_BUDGETS steps of batch 8 x 256, every held-out conversation, pydoc_qa on all
291 questions, six evaluations per run.

Each budget is one `opt-deus compare` command (printed before it runs, so it can be run by hand),
writing benchmarks/results/sft/steps-N/ (runs, report.md, report.json, PNGs); interrupted, it
resumes. Needs SFT in `opt-deus train` (TrainOptions.format) and `opt-deus eval` for --tasks.

    python -m benchmarks.sft                 # data, recipes, then both budgets of the reduced study
    python -m benchmarks.sft --seeds 1       # one seed only (two such calls can run side by side)
    python -m benchmarks.sft --full          # the study as first defined (hours on 2 CPU cores)
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

FULL_ARMS = ("copy", "upper-copy", "opt-deus-exact", "opt-deus-reference", "average", "stack")
ARMS = FULL_ARMS
REFERENCE = "copy"  # LLaMA-Pro, as in the continued pre-training tables
FULL_BUDGETS = (60, 240)
BUDGETS = (8, 16)
TASK_BUDGETS = (16,)  # pydoc_qa costs ~100 s per model on 2 cores: scored at the larger budget only
SEEDS = "0,1"
SAMPLE = 12  # every 12th held-out conversation and pydoc_qa question (25 each); 1 = all 291
BATCH_SIZE, FULL_BATCH_SIZE = 4, 8
SEQ_LEN, FULL_SEQ_LEN = 128, 256
# one setting for every arm (not tuned per arm); the SFT options are opt-deus train's own flags:
# the data are conversations ({"messages": [...]}), which `--format` detects when not given.
# Loss on the assistant's tokens only (the default --loss-on completion) needs {% generation %}
# markers, which SmolLM2's shipped template lacks: the same template with the markers.
TEMPLATE = Path(__file__).with_name("smollm2-chat-template.jinja")
TRAIN_FLAGS = ["--lr", "2e-4", "--device", "cpu", "--dtype", "float32"]
SFT_FLAGS = ["--loss-on", "completion", "--chat-template", str(TEMPLATE)]
TRAINER_ARGS = {
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "per_device_eval_batch_size": 16,
}


def warmup(steps: int) -> int:
    return max(1, round(steps / 10))  # 6 of 60 as first defined: a tenth of every budget


def recipes(work: Path, depth: int = 30) -> list[Path]:
    """The arms as recipe files (the label is the file's stem), from the quality study's definitions."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for arm in FULL_ARMS:
        path = work / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(Variant(arm).recipe(MODELS["smollm2-135m"], depth), sort_keys=False))
        paths.append(path)
    return paths


def sample(data_dir: Path, every: int) -> tuple[Path, Path]:
    """The held-out conversations and the pydoc_qa task on every `every`-th row (rows are grouped by
    module, so a stride spreads the sample over all of them): (held-out file, task directory)."""
    if every == 1:
        return data_dir / "heldout.jsonl", data_dir / "pydoc_qa"
    out = data_dir / f"sample-{every}"
    (out / "pydoc_qa").mkdir(parents=True, exist_ok=True)
    heldout = out / "heldout.jsonl"
    heldout.write_text("".join((data_dir / "heldout.jsonl").read_text().splitlines(keepends=True)[::every]))
    rows = (data_dir / "pydoc_qa" / "heldout_mc.jsonl").read_text().splitlines(keepends=True)[::every]
    (out / "pydoc_qa" / "heldout_mc.jsonl").write_text("".join(rows))
    (out / "pydoc_qa" / "pydoc_qa.yaml").write_text(
        data.TASK_YAML.format(data=(out / "pydoc_qa" / "heldout_mc.jsonl").resolve())
    )
    return heldout, out / "pydoc_qa"


def commands(
    work: Path,
    results: Path,
    arms=ARMS,
    budgets=BUDGETS,
    every: int = SAMPLE,
    batch_size: int = BATCH_SIZE,
    seq_len: int = SEQ_LEN,
    task_budgets: tuple[int, ...] = TASK_BUDGETS,
    seeds: str = SEEDS,
    evals: int = 1,
) -> list[list[str]]:
    """One `opt-deus compare` per budget; `evals` held-out evaluations after step 0 (every steps/evals)."""
    model = MODELS["smollm2-135m"].dir
    files = [work / "recipes" / f"{arm}.yaml" for arm in arms]
    ordered = [f for f in files if f.stem == REFERENCE] + [f for f in files if f.stem != REFERENCE]
    program = str(Path(sys.executable).parent / "opt-deus")
    heldout, task_dir = sample(work / "data", every)
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
            str(heldout),
            *(["--tasks", "pydoc_qa", "--include-path", str(task_dir)] if steps in task_budgets else []),
            "--steps",
            str(steps),
            "--seeds",
            seeds,
            "--eval-every",
            str(max(1, steps // evals)),
            "--args",
            str(work / f"trainer-{steps}.yaml"),
            "--batch-size",
            str(batch_size),
            "--seq-len",
            str(seq_len),
            *TRAIN_FLAGS,
            *SFT_FLAGS,
            "--out",
            str(results / f"steps-{steps}"),
        ]
        for steps in budgets
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=REPO / "bench-out" / "sft", help="data, recipes (git-ignored)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "sft")
    p.add_argument("--dry-run", action="store_true", help="build data and recipes, print the commands, run nothing")
    p.add_argument(
        "--full",
        action="store_true",
        help="the study as first defined: all arms, budgets "
        f"{FULL_BUDGETS}, batch {FULL_BATCH_SIZE}, all held-out data (hours on 2 CPU cores)",
    )
    p.add_argument("--budgets", help="comma-separated steps, one comparison each (default: the study's)")
    p.add_argument(
        "--seeds", default=SEEDS, help=f"comma-separated seeds (default {SEEDS}; a run already saved is skipped)"
    )
    p.add_argument("--task", action="store_true", help=f"pydoc_qa at every budget (default: at {TASK_BUDGETS} only)")
    p.add_argument(
        "--arms",
        help=f"comma-separated arms of {','.join(FULL_ARMS)}, or all (default: {','.join(ARMS)}; --full: all)",
    )
    args = p.parse_args(argv)
    budgets = (
        tuple(int(b) for b in args.budgets.split(",")) if args.budgets else (FULL_BUDGETS if args.full else BUDGETS)
    )
    if not MODELS["smollm2-135m"].dir.is_dir() and not args.dry_run:
        sys.exit(f"no {MODELS['smollm2-135m'].dir}: build it first with `python -m benchmarks.smollm2`")
    info = data.build(args.work / "data")
    print(
        f"data: {info['train']} training and {info['heldout']} held-out conversations, {info['multiple_choice']} "
        f"pydoc_qa questions (Python {info['python']})",
        flush=True,
    )
    recipes(args.work / "recipes")
    for steps in budgets:
        (args.work / f"trainer-{steps}.yaml").write_text(
            yaml.safe_dump({"warmup_steps": warmup(steps), **TRAINER_ARGS})
        )
    arms = FULL_ARMS if args.arms == "all" else tuple(args.arms.split(",")) if args.arms else None
    if arms is not None and not set(arms) <= set(FULL_ARMS):
        sys.exit(f"--arms {args.arms}: the arms are {','.join(FULL_ARMS)} (or all)")
    code = 0
    if args.full:
        todo = commands(
            args.work,
            args.results,
            arms or FULL_ARMS,
            budgets,
            1,
            FULL_BATCH_SIZE,
            FULL_SEQ_LEN,
            budgets,
            args.seeds,
            6,
        )
    else:
        todo = commands(
            args.work,
            args.results,
            arms or ARMS,
            budgets,
            SAMPLE,
            BATCH_SIZE,
            SEQ_LEN,
            budgets if args.task else TASK_BUDGETS,
            args.seeds,
        )
    for command in todo:
        print("$ " + shlex.join(command), flush=True)
        if not args.dry_run:
            code = max(code, subprocess.run(command).returncode)
    return code


if __name__ == "__main__":
    sys.exit(main())
