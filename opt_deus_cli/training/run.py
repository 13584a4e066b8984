"""`opt-deus train`: continue training an up-scaled model, only its new layers by default, with
transformers' Trainer (no loop of our own: distributed engines, mixed precision, checkpointing
and logging are the Trainer's): packed blocks of text, or supervised fine-tuning on chat,
prompt-completion and alpaca examples with TRL's SFTTrainer (sft.py), a subclass of it.

The same function runs in every process of a distributed launch (torchrun, accelerate launch):
each process reads the data (the main one tokenizes first, the others reuse its cache), the
Trainer synchronises the gradients, every process takes part in gathering the weights, and only
the world's rank 0 writes OUT and checks it; its verdict is then sent to the others, so every
process ends with the same outcome (and exit code)."""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import __version__
from ..errors import OptDeusError
from .data import DataFile, bos_of, build_blocks, collate_blocks, load_tokenizer
from .distributed import check_launch, engine_that_ran, engine_warning, outcome_of_rank_zero
from .freeze import freeze_base, frozen_rule
from .options import TrainOptions, training_arguments
from .request import check_checkpoint, check_request
from .save import gathered_state_dict, json_safe, write_output

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")  # config keys of a mixture of experts
# progress(phase, done, total): each phase named as it starts (total None: not counted), then the
# training steps; log(step, total_steps, logs) with Trainer's log dict
Progress = Callable[[str, int, int | None], None]
Log = Callable[[int, int, dict], None]


IGNORE = -100  # the label of a token that carries no loss
DIVERGED = 1.25  # a final loss above this many times the first: the run diverged


def _counting(trainer_class):
    """The Trainer class, counting the tokens that carried loss in the batches it trained on."""

    class Counting(trainer_class):
        loss_tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:  # the model predicts labels[1:] from the tokens before them
                self.loss_tokens += int((inputs["labels"][..., 1:] != IGNORE).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Counting


class _Report(TrainerCallback):
    """Progress, loss lines and step times, from the world's rank 0 only."""

    def __init__(self, progress: Progress | None, log: Log | None, label: str):
        self.progress, self.log, self.label = progress, log, label
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.progress:
            self.progress(self.label, 0, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)
        if state.is_world_process_zero and self.progress:
            self.progress(self.label, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.log and logs:
            self.log(state.global_step, state.max_steps, dict(logs))


def train(
    model_dir: Path | str,
    data: list[Path | str],
    out_dir: Path | str,
    options: TrainOptions = TrainOptions(),
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict:
    """Train, save OUT (config, safetensors, tokenizer, manifest carried forward) and return the
    training record written into OUT's manifest. Deterministic for a given seed and data order
    (on one device type and world size)."""
    try:
        return _train(Path(model_dir), data, Path(out_dir), options, progress, log)
    finally:  # however the run ends (Ctrl-C, an error, success), the Trainer's work directory goes
        _remove_if_empty(_work_dir(Path(out_dir)))


def _work_dir(out_dir: Path) -> Path:
    """The Trainer's output_dir (unless --args names one): hidden beside OUT."""
    return out_dir.parent / f".{out_dir.name}.trainer"


def _remove_if_empty(work_dir: Path) -> None:
    """The Trainer's work directory, unless it holds files (checkpoints asked for with --args). Every
    rank of a distributed run may get here at once: a directory another rank removed is no error."""
    try:
        if work_dir.is_dir() and not any(p.is_file() for p in work_dir.rglob("*")):
            shutil.rmtree(work_dir, ignore_errors=True)
    except FileNotFoundError:
        pass


def _train(
    model_dir: Path,
    data: list[Path | str],
    out_dir: Path,
    options: TrainOptions,
    progress: Progress | None,
    log: Log | None,
) -> dict:
    started = time.perf_counter()
    phase: Callable[[str], None] = (lambda name: progress(name, 0, None)) if progress else (lambda name: None)
    phase("reading data")
    request = check_request(model_dir, data, out_dir, options)
    check_checkpoint(model_dir)
    config, manifest, files, eval_files = request.config, request.manifest, request.files, request.eval_files
    shard_bytes, seq_len, fmt = request.shard_bytes, request.seq_len, request.format
    work_dir = _work_dir(out_dir)
    has_experts = any(k in config for k in EXPERT_COUNT_KEYS)
    if fmt == "text":
        args = training_arguments(options, work_dir, has_experts)
    else:
        from . import sft

        args = sft.sft_arguments(options, work_dir, has_experts, seq_len, fmt)
    check_launch(args)

    phase("tokenizing")
    tokenizer = load_tokenizer(model_dir)
    if fmt == "text":
        blocks = functools.partial(
            build_blocks,
            tokenizer=tokenizer,
            seq_len=seq_len,
            text_field=options.text_field,
            first=args.main_process_first,
            cache_dir=options.cache_dir,
        )
        train_data = blocks(files, what="training data")
        eval_data = blocks(eval_files, what="eval data") if eval_files else None
    else:
        template = sft.chat_template_of(tokenizer, options)
        examples = functools.partial(
            sft.prepare_examples, fmt=fmt, options=options, tokenizer=tokenizer, model_dir=model_dir, template=template
        )
        with args.main_process_first():
            train_data = examples(files, what="training data")
            eval_data = examples(eval_files, what="eval data") if eval_files else None
    phase("loading model")
    model = _load_model(model_dir, options.dtype)
    if options.train == "new":
        freeze_base(model, model_dir)
        # reentrant checkpointed blocks need an input that asks for gradients (the embeddings are frozen):
        # transformers 5 sees to it (activation_checkpointing), 4 does not (gradient_checkpointing)
        if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False):
            model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    from transformers import PrinterCallback, Trainer

    report = _Report(progress, log, f"training ({options.train} layers)")
    if fmt == "text":
        trainer = _counting(Trainer)(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            data_collator=collate_blocks,
            callbacks=[report],
        )
    else:
        trainer = sft.sft_trainer(model, args, tokenizer, train_data, eval_data, [report], options.drop_long)
    trainer.remove_callback(PrinterCallback)  # the log callback prints the lines
    result = trainer.train()
    history = trainer.state.log_history
    if eval_data is not None and not any(
        e.get("step") == trainer.state.global_step and "eval_loss" in e for e in history
    ):
        trainer.evaluate()
    loss_tokens = int(trainer.accelerator.reduce(torch.tensor(trainer.loss_tokens, device=args.device), "sum"))
    phase("gathering weights")
    state_dict = gathered_state_dict(trainer)

    if fmt == "text":
        bos = bos_of(tokenizer)
        data_record = {
            "format": "text",
            "loss_on": "all",
            "text_field": options.text_field,
            "train_blocks": len(train_data),
            "eval_blocks": len(eval_data) if eval_data is not None else None,
            "bos_per_block": bos is not None,
            "bos_token_id": bos,
        }
    else:
        data_record = sft.data_record(fmt, options, template, train_data, eval_data, trainer)
    record = _record(
        options,
        args,
        trainer,
        result,
        report,
        files,
        eval_files,
        seq_len,
        data_record,
        loss_tokens,
        manifest,
        trainable,
        total,
    )
    if fmt != "text":
        import trl

        record["versions"]["trl"] = trl.__version__
    is_frozen = frozen_rule(manifest) if options.train == "new" else None
    outcome = {}
    if trainer.is_world_process_zero():
        for problem in [*record["divergence"], engine_warning(record["distributed"])]:  # on screen; also in the record
            if problem:
                warnings.warn(problem, stacklevel=2)
        record["seconds_total"] = round(time.perf_counter() - started, 3)
        write = functools.partial(
            write_output,
            trainer.accelerator.unwrap_model(trainer.model),
            state_dict,
            model_dir,
            out_dir,
            options.overwrite,
            shard_bytes,
            manifest,
            is_frozen,
            record,
            options.copy_extra,
            phase,
        )
        outcome = _attempt(write, out_dir) if args.world_size > 1 else {"record": write()}
    del state_dict
    outcome = outcome_of_rank_zero(outcome, args.device)
    if "error" in outcome:
        raise OptDeusError(outcome["error"], outcome["exit_code"])
    return outcome["record"]


def _attempt(write: Callable[[], dict], out_dir: Path) -> dict:
    """Rank 0's write in a distributed run: its failure, too, becomes an outcome for every rank."""
    try:
        return {"record": write()}
    except OptDeusError as e:
        return {"error": str(e), "exit_code": e.exit_code}
    except Exception as e:  # a bug: the other ranks must not wait forever
        return {"error": f"rank 0 failed writing {out_dir}: {type(e).__name__}: {e}", "exit_code": 1}


def _load_model(model_dir: Path, dtype: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = "auto" if dtype == "keep" else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, trust_remote_code=False, use_safetensors=True, local_files_only=True
        )
    except Exception as e:  # transformers raises many kinds; name the directory and the reason
        raise OptDeusError(
            f"transformers cannot load {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def _history(log_history: list[dict]) -> list[dict]:
    """Trainer's log lines, reduced to what a study reads: train loss and eval loss by step."""
    rows = []
    for entry in log_history:
        if "loss" in entry:
            rows.append({k: entry[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in entry})
        elif "eval_loss" in entry:
            rows.append({"step": entry["step"], "eval_loss": entry["eval_loss"]})
    return json_safe(rows)


def divergence(history: list[dict]) -> list[str]:
    """What says the run went wrong: a non-finite loss, a final loss well above the first, a
    gradient norm that became non-finite or collapsed to 0. Empty when none of it happened."""
    losses = [(row["step"], row["loss"]) for row in history if "loss" in row]
    norms = [(row["step"], row["grad_norm"]) for row in history if row.get("grad_norm") is not None]
    found = []
    bad = [(step, x) for step, x in losses if not math.isfinite(x)]
    if bad:
        found.append(f"the training loss became {bad[0][1]} at step {bad[0][0]}: the run diverged; lower --lr")
    elif len(losses) >= 2 and losses[-1][1] > DIVERGED * losses[0][1]:
        found.append(
            f"the final training loss {losses[-1][1]:.4f} is well above the first {losses[0][1]:.4f}: "
            "the run diverged and the saved model is worse than the input; lower --lr"
        )
    bad = [(step, x) for step, x in norms if not math.isfinite(x)]
    if bad:
        found.append(f"the gradient norm became {bad[0][1]} at step {bad[0][0]}: the run diverged; lower --lr")
    elif norms and norms[-1][1] == 0:
        found.append(
            f"the gradient norm collapsed to 0 (step {norms[-1][0]}): the trained layers no longer learn "
            "(saturated or dead); lower --lr"
        )
    return found


def _record(
    options,
    args,
    trainer,
    result,
    report,
    files,
    eval_files,
    seq_len,
    data_record,
    loss_tokens,
    manifest,
    trainable,
    total,
) -> dict:
    import datasets
    import transformers

    state, history = trainer.state, _history(trainer.state.log_history)
    losses = [row["loss"] for row in history if "loss" in row]
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    steps_timed = report.step_seconds[1:] or report.step_seconds  # the first step warms up
    return {
        "train": options.train,
        "trainable_layers": list(manifest.trainable_layers) if options.train == "new" else "all",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "data": [dataclasses.asdict(DataFile.of(p)) for p in files],
        "eval_data": [dataclasses.asdict(DataFile.of(p)) for p in eval_files],
        **data_record,
        "seq_len": seq_len,
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens": int(state.num_input_tokens_seen),  # tokens seen (without padding)
        "loss_tokens": loss_tokens,  # tokens that carried loss
        "world_size": args.world_size,
        "distributed": engine_that_ran(trainer, options.trainer_args),  # what ran, not what --args asked for
        "per_device_batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "global_batch_blocks": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "dtype": options.dtype,
        "device": args.device.type,
        "torch_threads": torch.get_num_threads(),
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "eval_loss": evals[-1] if evals else None,
        "seconds": round(result.metrics.get("train_runtime", 0.0), 3),
        "seconds_per_step": round(statistics.median(steps_timed), 4) if steps_timed else None,
        "history": history,
        "divergence": divergence(history),
        "trainer_args": json_safe(options.trainer_args),
        "versions": {
            "opt-deus": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
    }
