"""Supervised fine-tuning on TRL (issue 20): chat, prompt-completion and alpaca examples through
`SFTTrainer` and `SFTConfig`, with TRL's own tokenization, chat templates, loss masks, collator,
truncation and packing.

What opt-deus adds is bookkeeping around TRL's dataset preparation, not a second one: the examples
are first prepared by TRL without truncation (so the examples longer than --seq-len can be counted,
and dropped with --drop-long), then handed back to TRL, which truncates, drops examples left with
no loss token and packs. The trainer counts the tokens that carried loss in the batches it trained
on (labels that are not -100 after the model's one-token shift)."""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import OptDeusError, UsageError
from .data import bos_of
from .formats import Examples, alpaca_as_prompt_completion, read_examples, require_chat_template, set_chat_template
from .options import TrainOptions, merged_settings, sft_config_fields, training_argument_fields

IGNORE = -100  # the label of a token that carries no loss (transformers' and TRL's convention)
# SFTConfig fields the command's flags set: one place says what a run does
OWNED = {
    "max_length": "--seq-len",
    "packing": "--packing",
    "padding_free": "--packing",
    "completion_only_loss": "--loss-on",
    "assistant_only_loss": "--loss-on",
    "chat_template_path": "--chat-template",
}


def sft_arguments(options: TrainOptions, work_dir: Path, has_experts: bool, seq_len: int, fmt: str):
    """SFTConfig for this run: --args (SFTConfig fields), the flags, opt-deus's defaults."""
    from trl import SFTConfig

    for key, flag in OWNED.items():
        if key in options.trainer_args:
            raise UsageError(f"{key} in the --args file is set by {flag} here; use the flag")
    settings = merged_settings(options, work_dir, has_experts, training_argument_fields() | sft_config_fields())
    completion_only = options.loss_on == "completion"
    settings.update(
        max_length=seq_len,
        packing=options.packing,
        completion_only_loss=completion_only and fmt != "chat",
        assistant_only_loss=completion_only and fmt == "chat",
    )
    settings["include_num_input_tokens_seen"] = "non_padding"  # padded batches: count the real tokens
    # SFTConfig's own defaults differ from TrainingArguments' (checkpointing and bf16 on): opt-deus's
    # defaults are the same in both modes, and --dtype / --args say otherwise
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(options.trainer_args):
        settings["activation_checkpointing"] = False
    settings.setdefault("bf16", False)
    try:
        return SFTConfig(**settings)
    except (ValueError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"SFTConfig refused the settings: {first}") from e


def prepare_examples(
    files: list[Path], fmt: str, options: TrainOptions, tokenizer, model_dir: Path, what: str, template: str | None
) -> Examples:
    """The rows of the files as SFTTrainer takes them (alpaca as prompt-completion)."""
    examples = read_examples(files, fmt, options.text_field, options.cache_dir, what)
    if fmt == "alpaca":
        examples.dataset = alpaca_as_prompt_completion(examples.dataset, with_chat_template=template is not None)
    elif fmt == "chat" or not isinstance(examples.dataset[0]["prompt"], str):
        require_chat_template(template, model_dir)
    return examples


def chat_template_of(tokenizer, options: TrainOptions) -> str | None:
    """--chat-template on the tokenizer; where the template in use comes from (None: there is none)."""
    return set_chat_template(tokenizer, options.chat_template)


def _trainer_class():
    """SFTTrainer with opt-deus's bookkeeping (defined on first use: trl is imported only then)."""
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        def __init__(self, *args, drop_long: bool = False, **kwargs):
            self.drop_long, self.loss_tokens, self.prepared = drop_long, 0, {}
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            if "input_ids" in dataset.column_names:  # already prepared
                return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            whole = copy.copy(args)  # TRL's tokenization and labels, untruncated and in order
            whole.max_length, whole.shuffle_dataset = None, False
            tokenized = super()._prepare_dataset(dataset, processing_class, whole, False, formatting_func, dataset_name)
            limit = args.max_length
            lengths = [len(ids) for ids in tokenized["input_ids"]]
            long = sum(n > limit for n in lengths)
            if self.drop_long and long:
                tokenized = tokenized.filter(lambda row: len(row["input_ids"]) <= limit)
            kept = len(tokenized)
            if kept == 0:
                raise OptDeusError(
                    f"every {dataset_name} example is longer than --seq-len {limit}; "
                    "raise --seq-len or leave out --drop-long"
                )
            bos = bos_of(processing_class)
            starts = sum(ids[0] == bos for ids in tokenized["input_ids"] if ids) if bos is not None else 0
            prepared = super()._prepare_dataset(tokenized, processing_class, args, packing, None, dataset_name)
            self.prepared[dataset_name] = {
                "examples": kept,
                "truncated": 0 if self.drop_long else long,
                "dropped_long": long if self.drop_long else 0,
                # after truncation, a prompt that fills --seq-len leaves nothing to learn: TRL drops it
                "dropped_no_loss_after_truncation": 0 if packing else kept - len(prepared),
                "data_tokens": sum(min(n, limit) for n in lengths if not (self.drop_long and n > limit)),
                "examples_starting_with_bos": starts,
                "sequences": len(prepared),  # rows fed to the trainer (packed rows with --packing)
            }
            return prepared

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # the model predicts labels[1:] from the tokens before them
                self.loss_tokens += int((inputs["labels"][..., 1:] != IGNORE).sum())
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return CountingSFTTrainer


def sft_trainer(model, args, tokenizer, train: Examples, evaluation: Examples | None, callbacks: list, drop_long: bool):
    """SFTTrainer on the examples; TRL's refusals (a template without assistant markers, ...) become one line."""
    try:
        return _trainer_class()(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=train.dataset,
            eval_dataset=evaluation.dataset if evaluation else None,
            callbacks=callbacks,
            drop_long=drop_long,
        )
    except ValueError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "not training-compatible" in message:
            raise UsageError(
                "--loss-on completion on chat data needs a chat template that marks the assistant turns "
                "with {% generation %} ... {% endgeneration %} (TRL knows no training version of this one); "
                "add the markers (see examples/chat-template.jinja) or use --loss-on all"
            ) from e
        raise OptDeusError(f"TRL's SFTTrainer refused the data or settings: {message}") from e


def data_record(
    fmt: str, options: TrainOptions, template: str | None, train: Examples, evaluation: Examples | None, trainer
) -> dict:
    """The format-specific part of the training record: what was read, left out and trained on."""

    def part(examples: Examples, name: str) -> dict:
        return {"rows": examples.rows, "skipped": dict(examples.skipped), **trainer.prepared.get(name, {})}

    record = {
        "format": fmt,
        "loss_on": options.loss_on,
        "packing": options.packing,
        "chat_template": template,
        "examples": trainer.prepared["train"]["examples"],
        "train_examples": part(train, "train"),
        "eval_examples": part(evaluation, "eval") if evaluation is not None else None,
    }
    if options.packing:
        record["packing_strategy"] = trainer.args.packing_strategy
    return record
