"""`opt-deus train`: continue training an up-scaled model (only its new layers by default) with
transformers' Trainer; runs unchanged under torchrun and accelerate launch."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..errors import OptDeusError, UsageError
from .common import PlainUsage, app, console, fail, out, progress_bar, run


def _rank() -> int:
    """This process's rank in a torchrun / accelerate launch (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def _log_line(step: int, total: int, logs: dict) -> str | None:
    if "loss" in logs:
        line = f"step {step}/{total}  loss {logs['loss']:.4f}"
        if "learning_rate" in logs:
            line += f"  lr {logs['learning_rate']:.3g}"
        if "grad_norm" in logs:
            line += f"  grad_norm {logs['grad_norm']:.3g}"
        return line
    if "eval_loss" in logs:
        return f"step {step}/{total}  eval_loss {logs['eval_loss']:.4f}"
    return None


@app.command(cls=PlainUsage, short_help="Train the new layers (or all) with transformers' Trainer.")
def train(
    model_dir: Path = typer.Argument(
        ..., metavar="MODEL_DIR", help="An opt-deus output (with its manifest), or any model with --train all."
    ),
    more_data: list[Path] | None = typer.Argument(
        None,
        metavar="DATA",
        show_default=False,
        help="More training files: `--data a.txt b.txt` (or a shell glob) lists several.",
    ),
    data: list[Path] = typer.Option(
        ..., "--data", help="Training files: .txt/.md (one document each), .json/.jsonl, .parquet, .csv."
    ),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Output directory: the trained model, loadable like the input."
    ),
    steps: int | None = typer.Option(None, help="Optimizer steps (max_steps)."),
    epochs: float | None = typer.Option(None, help="Passes over the data (default 1 when --steps is not given)."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 1e-4)."),
    batch_size: int | None = typer.Option(None, help="Blocks per device per micro-step (default 8)."),
    grad_accum: int | None = typer.Option(None, help="Micro-steps per optimizer step (default 1)."),
    seq_len: int | None = typer.Option(None, help="Tokens per block (default min(1024, max_position_embeddings))."),
    train_mode: str = typer.Option(
        "new", "--train", help="new: only the manifest's new layers | all: every parameter."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda (several GPUs: one process each via torchrun)."),
    dtype: str = typer.Option(
        "float32",
        help="Weights while training: float32 | bfloat16 | float16 | keep. The saved weights keep the input's dtypes.",
    ),
    seed: int | None = typer.Option(None, help="Seed of data order and dropout (default 0)."),
    eval_data: list[Path] | None = typer.Option(None, "--eval-data", help="Held-out files: eval loss at the end."),
    eval_every: int | None = typer.Option(None, help="Also evaluate every N steps (needs --eval-data)."),
    text_field: str | None = typer.Option(None, help="The text column of json/jsonl/parquet/csv files (default text)."),
    data_format: str | None = typer.Option(
        None, "--format", help="text | chat | prompt-completion | alpaca (default: from the first row's columns)."
    ),
    loss_on: str = typer.Option(
        "completion", help="SFT: completion (only completion / assistant tokens carry loss) | all."
    ),
    packing: bool = typer.Option(
        False, help="SFT: pack examples into --seq-len rows (TRL's best-fit packing, padding-free)."
    ),
    chat_template: Path | None = typer.Option(
        None, "--chat-template", help="SFT: a Jinja chat template file, for a tokenizer without one."
    ),
    drop_long: bool = typer.Option(
        False, help="SFT: drop examples longer than --seq-len (default: truncate them, counted in the record)."
    ),
    cache_dir: Path | None = typer.Option(
        None, help="Where datasets keeps the read and tokenized data (default: its cache, HF_DATASETS_CACHE)."
    ),
    args_file: Path | None = typer.Option(
        None,
        "--args",
        help="YAML of transformers TrainingArguments fields (FSDP, DeepSpeed, bf16, ...); SFTConfig fields for SFT data.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output (only once the new one is complete and checked)."
    ),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB."),
    copy_extra: list[str] | None = typer.Option(
        None,
        "--copy-extra",
        metavar="GLOB",
        help="Also copy the input's files matching GLOB (repeatable); by default only tokenizer, generation config, chat template, licence and notice files are.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the training record as JSON."),
):
    """Train only the new layers (or all) with transformers' Trainer; write a checked, loadable model.

    Text is packed into --seq-len blocks (continued pre-training); chat, prompt-completion and
    alpaca rows are supervised fine-tuning with TRL's SFTTrainer (--args keys: SFTConfig fields).

    With --train new (the default) only the layers the manifest lists train, and every other
    tensor of OUT is checked bit-identical to the input's. OUT carries the manifest forward with
    a training record (data and sha256, steps, tokens, losses, seconds, world size)."""
    main = _rank() == 0
    # the arguments first: a usage error is one line, before torch and transformers are imported
    from ..training import TrainOptions
    from ..training.data import file_format
    from ..training.options import read_args_file
    from ..training.request import check_request

    data = [*data, *(more_data or [])]  # click gives --data one value; the files after it land here
    if text_field is not None and all(run(file_format, p) == "text" for p in [*data, *(eval_data or [])]):
        fail(
            UsageError(
                f"--text-field {text_field} names a column of .json/.jsonl/.parquet/.csv files; these are plain text "
                "(each file one document): drop the option"
            )
        )
    options = TrainOptions(
        train=train_mode,
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        device=device,
        dtype=dtype,
        seed=seed,
        eval_data=tuple(eval_data or ()),
        eval_every=eval_every,
        text_field=text_field or "text",
        cache_dir=cache_dir,
        overwrite=overwrite,
        shard_size=shard_size,
        format=data_format,
        loss_on=loss_on,
        packing=packing,
        drop_long=drop_long,
        chat_template=str(chat_template) if chat_template else None,
        copy_extra=tuple(copy_extra or ()),
    )
    run(check_request, model_dir, data, out_dir, options)  # usage errors before torch, transformers, datasets
    with progress_bar(enabled=main and not as_json) as bar:
        # the first line at once: importing torch and transformers alone takes seconds
        task = bar.add_task("starting (importing torch, transformers)", total=None)
        bar.update(task, completed=0)
        # the --args file's keys are checked against transformers' own TrainingArguments (and SFTConfig)
        options.trainer_args = run(read_args_file, args_file) if args_file else {}
        from ..training.run import train as run_train

        phases = {"current": task, "name": None}

        def on_progress(phase: str, done: int, total: int | None) -> None:
            if phase != phases["name"]:  # a task per phase: its own count (or none) and its own time left
                bar.remove_task(phases["current"])
                phases["current"], phases["name"] = bar.add_task(phase, total=total), phase
            bar.update(phases["current"], description=phase, completed=done, total=total)

        def on_log(step: int, total: int, logs: dict) -> None:
            line = _log_line(step, total, logs)
            if line:
                console.print(line, markup=False)

        if main:
            record = run(run_train, model_dir, data, out_dir, options, on_progress, on_log)
        else:  # the error line comes from rank 0 alone; the other ranks exit with its code
            try:
                record = run_train(model_dir, data, out_dir, options, on_progress, on_log)
            except OptDeusError as e:
                raise typer.Exit(e.exit_code) from e
    if not main:
        return
    if as_json:
        out.print_json(data=record)
        return
    trained = f"new layers {record['trainable_layers']}" if record["train"] == "new" else "all layers"
    evaluated = f", eval loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else ""
    final = f"; final loss {record['final_loss']:.4f}" if record.get("final_loss") is not None else ""
    out.print(
        f"wrote {out_dir}: trained {trained} ({record['trainable_parameters'] / 1e6:.2f}M of "
        f"{record['total_parameters'] / 1e6:.2f}M parameters) for {record['steps']} steps, "
        f"{record['format']} data, {record['tokens']} tokens ({record['loss_tokens']} carrying loss), "
        f"world size {record['world_size']}, in {record['seconds']:.1f} s"
        f"{final}{evaluated}"
    )
    if record["train"] == "new":
        out.print(f"checked: {record['check']['frozen_identical']} base tensors bit-identical to {model_dir}")
