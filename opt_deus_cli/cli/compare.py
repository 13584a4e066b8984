"""`opt-deus compare`: up-scale a base with several recipes, train only the new layers of each with
several seeds, and report which recipe the data supports (paired by seed)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from .common import PlainUsage, app, console, fail, out, progress_bar, run


def _listed(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail(UsageError(f"{option} lists nothing; give comma-separated values"))
    return items


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _listed(text, "--seeds"))
    except ValueError:
        fail(UsageError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2"))


def _recipes(names: list[str]) -> dict:
    """label -> Recipe: a shipped name is its own label, a YAML file its stem."""
    from ..recipe import load_recipe

    found = {}
    for name in names:
        label = Path(name).stem if name.endswith((".yaml", ".yml")) else name
        if label in found:
            fail(UsageError(f"--recipes names {label} twice; each recipe once"))
        found[label] = run(load_recipe, name)
    return found


@app.command(
    cls=PlainUsage, short_help="Which recipe trains best on your model and data: recipes x seeds, paired by seed."
)
def compare(
    base: str = typer.Argument(..., metavar="BASE", help="The base model: a directory or a Hub repo id."),
    more_data: list[Path] | None = typer.Argument(
        None, metavar="DATA", show_default=False, help="More training files after --data (a shell glob)."
    ),
    recipes: str = typer.Option(
        ...,
        "--recipes",
        help="Comma-separated recipes: shipped names or YAML files, e.g. llama-pro,upper-copy,top-half.",
    ),
    data: list[Path] = typer.Option(..., "--data", help="Training files, as for `opt-deus train`."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="The comparison's directory: models, one JSON per run, report.md, report.json, PNGs."
    ),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps of every run."),
    seeds: str = typer.Option(
        ..., "--seeds", help="Comma-separated seeds (the data order); at least 2 for a claim, e.g. 0,1,2."
    ),
    eval_data: list[Path] | None = typer.Option(
        None, "--eval-data", help="Held-out files: eval loss at step 0, every --eval-every steps and at the end."
    ),
    eval_every: int | None = typer.Option(None, help="Evaluate every N steps (default a tenth of --steps)."),
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        help="Comma-separated lm-eval tasks (opt-deus eval), scored on each model as built and trained.",
    ),
    limit: float | None = typer.Option(None, help="With --tasks: documents per task (lm-eval's limit)."),
    num_fewshot: int | None = typer.Option(None, help="With --tasks: few-shot examples (lm-eval's num_fewshot)."),
    include_path: Path | None = typer.Option(
        None, help="With --tasks: a directory of lm-eval task YAMLs of your own (lm-eval's include_path)."
    ),
    reference: str | None = typer.Option(
        None, "--reference", help="The recipe differences are taken against (default: the first of --recipes)."
    ),
    launcher: str | None = typer.Option(
        None,
        "--launcher",
        help='Run each train step as `LAUNCHER opt-deus train ...`, e.g. "torchrun --nproc_per_node 8".',
    ),
    lr: float | None = typer.Option(None, help="Peak learning rate (as opt-deus train)."),
    batch_size: int | None = typer.Option(None, help="Blocks per device per micro-step."),
    grad_accum: int | None = typer.Option(None, help="Micro-steps per optimizer step."),
    seq_len: int | None = typer.Option(None, help="Tokens per block."),
    train_mode: str = typer.Option("new", "--train", help="new: only the new layers | all: every parameter."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (training and up-scaling)."),
    dtype: str = typer.Option("float32", help="Weights while training: float32 | bfloat16 | float16 | keep."),
    text_field: str = typer.Option("text", help="The text column of json/jsonl/parquet files."),
    args_file: Path | None = typer.Option(
        None, "--args", help="YAML of transformers TrainingArguments fields, for every run."
    ),
    data_format: str | None = typer.Option(
        None, "--format", help="Data format for supervised fine-tuning (opt-deus train --format)."
    ),
    loss_on: str | None = typer.Option(None, help="SFT: which tokens carry the loss (opt-deus train --loss-on)."),
    packing: bool | None = typer.Option(
        None, "--packing/--no-packing", help="SFT: pack examples (opt-deus train --packing)."
    ),
    chat_template: str | None = typer.Option(None, help="SFT: chat template (opt-deus train --chat-template)."),
    drop_long: bool | None = typer.Option(
        None, "--drop-long/--no-drop-long", help="SFT: drop over-long examples (opt-deus train --drop-long)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print report.json on stdout."),
):
    """Compare recipes on YOUR model and data: each recipe up-scaled once, only its new layers trained
    with every seed, evaluated; one JSON per run (a re-run skips saved runs), then DIR/report.md,
    report.json and PNGs with differences paired by seed. Exit 1 when some run failed."""
    from ..compare import CompareSpec, with_evaluation, with_train_fields
    from ..compare.report import write_report
    from ..compare.runner import run_comparison
    from ..hub import resolve_model
    from ..training import TrainOptions
    from ..training.options import read_args_file

    trainer_args = run(read_args_file, args_file) if args_file else {}
    options = TrainOptions(
        train=train_mode,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        device=device,
        dtype=dtype,
        eval_data=tuple(eval_data or ()),
        eval_every=eval_every,
        text_field=text_field,
        trainer_args=trainer_args,
    )
    options = run(
        with_train_fields,
        options,
        {
            "format": data_format,
            "loss_on": loss_on,
            "packing": packing,
            "chat_template": chat_template,
            "drop_long": drop_long,
        },
    )
    if not tasks and (limit is not None or num_fewshot is not None or include_path is not None):
        fail(UsageError("--limit, --num-fewshot and --include-path apply to --tasks; give --tasks or leave them out"))
    # tasks score the models in the dtype the held-out loss is computed in (not a bf16 checkpoint's own)
    task_options = {
        "limit": limit,
        "num_fewshot": num_fewshot,
        "device": device,
        "dtype": dtype,
        "include_path": str(include_path.resolve()) if include_path else None,
    }
    task_options = {k: v for k, v in task_options.items() if v is not None} if tasks else {}
    spec = CompareSpec(
        base=run(resolve_model, base).path,
        recipes=_recipes(_listed(recipes, "--recipes")),
        data=tuple([*data, *(more_data or [])]),
        options=run(with_evaluation, options),
        seeds=_seeds(seeds),
        reference=reference,
        tasks=tuple(_listed(tasks, "--tasks")) if tasks else (),
        task_options=task_options,
        launcher=launcher,
        upscale_device=device,
    )
    with progress_bar(enabled=not as_json) as bar:
        task = bar.add_task("comparing", total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            bar.update(task, description=what if what == "done" else f"training {what}", completed=done, total=total)

        def say(line: str) -> None:
            console.print(line, markup=False)

        outcome = run(run_comparison, spec, out_dir, say, on_progress)
    report = run(write_report, out_dir, spec.reference_label)
    if as_json:
        out.print_json(data=report)
    else:
        for line in report["recommendation"]:
            out.print(line, markup=False)
        out.print(
            f"wrote {out_dir / 'report.md'}, report.json and {len(report['figures'])} figure(s); "
            f"{outcome['ran']} run(s) trained now, {outcome['skipped']} read back, {len(outcome['failed'])} failed"
        )
    if outcome["failed"]:
        raise typer.Exit(1)
