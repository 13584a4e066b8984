"""What a training run is asked to do: TrainOptions (the command's flags) and the `--args` file,
merged into one transformers `TrainingArguments`.

The `--args` file's keys are TrainingArguments fields, passed through as they are, so FSDP,
DeepSpeed, gradient checkpointing, bf16, schedulers, logging and `report_to` are the Trainer's
own. A flag and the same field in the file is a conflict (one place says what a run does); a
field set by neither takes opt-deus's default below."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

TRAIN_MODES = ("new", "all")
DEVICES = ("auto", "cpu", "cuda")
TRAINING_DTYPES = ("float32", "bfloat16", "float16", "keep")
DATA_FORMATS = ("text", "chat", "prompt-completion", "alpaca")  # training/formats.py reads them
LOSS_ON = ("completion", "all")

# flag (TrainOptions field) -> the TrainingArguments field it sets
FLAG_FIELDS = {
    "steps": "max_steps",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "seed": "seed",
    "eval_every": "eval_steps",
}
FLAG_NAMES = {
    "steps": "--steps",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "seed": "--seed",
    "eval_every": "--eval-every",
}

# what a run does when neither a flag nor the --args file says otherwise
DEFAULTS = {
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "seed": 0,
    "num_train_epochs": 1.0,
    "save_strategy": "no",  # the result is OUT; intermediate checkpoints only when asked for
    "report_to": "none",
    "logging_steps": 0.05,  # a loss line every 5% of the run (a share of the steps, as Trainer reads < 1)
    "disable_tqdm": True,  # opt-deus shows its own progress bar
    "include_num_input_tokens_seen": True,
}


@dataclass
class TrainOptions:
    """The knobs of `opt-deus train`; None = not set (the --args file or the default decides)."""

    train: str = "new"  # new: only the manifest's trainable layers | all: every parameter
    steps: int | None = None  # optimizer steps (max_steps); else epochs
    epochs: float | None = None  # passes over the data (1 when neither is given)
    lr: float | None = None  # peak learning rate (1e-4)
    batch_size: int | None = None  # blocks per device and micro-step (8)
    grad_accum: int | None = None  # micro-steps per optimizer step (1)
    seq_len: int | None = None  # tokens per block (min(1024, the model's max_position_embeddings))
    device: str = "auto"  # auto | cpu | cuda (one process per GPU: torchrun / accelerate launch)
    dtype: str = "float32"  # weights while training; the saved weights always keep the input's dtypes
    seed: int | None = None  # model init of nothing, data order and dropout (0)
    eval_data: tuple[Path, ...] = ()  # held-out files: eval loss at the end (and every eval_every steps)
    eval_every: int | None = None  # evaluate every N steps (eval_strategy "steps")
    text_field: str = "text"  # the text column of json/jsonl/parquet files
    cache_dir: Path | None = None  # datasets' cache for the read and tokenized data (None: its default)
    trainer_args: dict = field(default_factory=dict)  # TrainingArguments fields (the --args file)
    overwrite: bool = False  # replace an existing OUT (only by a complete new result)
    shard_size: str = "5GB"  # largest output shard
    # supervised fine-tuning (issue 20): chat, prompt-completion and alpaca data go through TRL's SFTTrainer
    format: str | None = None  # text | chat | prompt-completion | alpaca; None: from the first row's columns
    loss_on: str = "completion"  # completion: only completion / assistant tokens carry loss | all: every token
    packing: bool = False  # pack examples into --seq-len rows (TRL's best-fit, padding-free with position ids)
    chat_template: str | None = None  # a Jinja file for a tokenizer without a chat template (or to replace it)
    drop_long: bool = False  # drop examples longer than --seq-len instead of truncating them
    copy_extra: tuple[str, ...] = ()  # globs of input files to copy beyond the model's own (--copy-extra)

    def check(self) -> None:
        if self.train not in TRAIN_MODES:
            raise UsageError(f"--train {self.train!r} not understood; use new (only the new layers) or all")
        if self.device not in DEVICES:
            raise UsageError(
                f"--device {self.device!r} not understood; use auto, cpu or cuda "
                "(several GPUs: one process each, with torchrun or accelerate launch)"
            )
        if self.dtype not in TRAINING_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} not understood; use {', '.join(TRAINING_DTYPES)}")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("--steps and --epochs both given; a run has one length: keep one")
        for name, low, kind in (
            ("steps", 1, int),
            ("batch_size", 1, int),
            ("grad_accum", 1, int),
            ("seq_len", 2, int),
            ("eval_every", 1, int),
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < low):
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ("epochs", "lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"--{name} must be positive, got {value!r}")
        if self.format is not None and self.format not in DATA_FORMATS:
            raise UsageError(
                f"--format {self.format!r} not understood; use {', '.join(DATA_FORMATS)} "
                "(or leave it out: the first row's columns tell)"
            )
        if self.loss_on not in LOSS_ON:
            raise UsageError(
                f"--loss-on {self.loss_on!r} not understood; use completion (only completion / "
                "assistant tokens carry loss) or all"
            )
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise UsageError(f"--chat-template file {self.chat_template} does not exist")
        if self.eval_every is not None and not self.eval_data:
            raise UsageError("--eval-every needs --eval-data (the held-out files to evaluate on)")


def read_args_file(path: Path | str) -> dict:
    """The --args YAML: a mapping of TrainingArguments fields (SFTConfig's too: chat,
    prompt-completion and alpaca data train with TRL), checked by name."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--args file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--args {path} is not readable YAML ({first})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"--args {path} must be a mapping of TrainingArguments fields (key: value), not a {type(data).__name__}"
        )
    check_field_names(data, str(path), training_argument_fields() | sft_config_fields())
    return data


def training_argument_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def sft_config_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_field_names(settings: dict, where: str, known: set[str] | None = None) -> None:
    text_mode = known is None
    known = training_argument_fields() if known is None else known
    unknown = [k for k in settings if k not in known]
    sft_only = [k for k in unknown if k in sft_config_fields()] if unknown and text_mode else []
    if sft_only:
        raise UsageError(
            f"{where}: {sft_only[0]!r} is an SFTConfig field, for chat, prompt-completion or alpaca "
            "data; this data is text (continued pre-training, TrainingArguments)"
        )
    unknown = [k for k in settings if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kind = "TrainingArguments" if text_mode else "TrainingArguments or SFTConfig"
        raise UsageError(
            f"{where}: {', '.join(hints)} {'is not a' if len(unknown) == 1 else 'are not'} "
            f"{kind} field(s); see transformers' TrainingArguments (and TRL's SFTConfig) for the names"
        )


def merged_settings(
    options: TrainOptions, work_dir: Path, has_experts: bool = False, known: set[str] | None = None
) -> dict:
    """The TrainingArguments keyword arguments: the --args file, the flags, then the defaults.
    has_experts: a mixture of experts, whose unrouted experts DDP must be told about; known: the
    fields the --args file may name (TrainingArguments', or SFTConfig's for supervised fine-tuning)."""
    settings = dict(options.trainer_args)
    check_field_names(settings, "--args", known)
    for flag, key in FLAG_FIELDS.items():
        value = getattr(options, flag)
        if value is None:
            continue
        if key in settings:
            raise UsageError(f"{FLAG_NAMES[flag]} and {key} in the --args file both set this run's {key}; keep one")
        settings[key] = value
    if options.steps is not None and "num_train_epochs" in settings:
        raise UsageError("--steps and num_train_epochs in the --args file both set the run's length; keep one")
    if options.epochs is not None and "max_steps" in settings:
        raise UsageError("--epochs and max_steps in the --args file both set the run's length; keep one")
    if options.eval_every is not None:
        settings.setdefault("eval_strategy", "steps")
    if options.device == "cpu":
        settings["use_cpu"] = True
    for key, value in DEFAULTS.items():
        settings.setdefault(key, value)
    settings.setdefault("per_device_eval_batch_size", settings["per_device_train_batch_size"])
    # dense blocks use every parameter in each forward: spare DDP its search for unused ones
    settings.setdefault("ddp_find_unused_parameters", has_experts)
    if options.device == "cpu" or not _cuda_available():
        settings.setdefault("dataloader_pin_memory", False)  # nothing to pin for
    settings.setdefault("output_dir", str(work_dir))
    return settings


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def training_arguments(options: TrainOptions, work_dir: Path, has_experts: bool = False):
    """TrainingArguments for this run (creating it sets up the distributed state under torchrun)."""
    from transformers import TrainingArguments

    if options.device == "cuda" and not _cuda_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu or auto")
    settings = merged_settings(options, work_dir, has_experts)
    try:
        return TrainingArguments(**settings)
    except (ValueError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"TrainingArguments refused the settings: {first}") from e
