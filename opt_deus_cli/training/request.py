"""What a training run is asked for, checked before any heavy import: the options' values, the
model's config.json and manifest, the data files, the output place, the shard size and the block
length. The `train` command calls check_request first, so every usage error comes at once,
without torch, transformers or datasets (training.run, the work, imports them and calls it too).
A new option of the run (an SFT dataset, an eval task) adds its check here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import Checkpoint, read_config
from ..errors import OptDeusError, UsageError
from ..manifest import MANIFEST_FILE, Manifest, read_manifest
from ..output import OutputTransaction, check_extra_globs
from ..shards import parse_size
from .data import check_files
from .formats import check_options, detect_format
from .options import TrainOptions


@dataclass(frozen=True)
class Request:
    config: dict  # the model's config.json as stored
    manifest: Manifest | None
    files: list[Path]  # --data, checked to exist and be readable formats
    eval_files: list[Path]
    format: str  # text | chat | prompt-completion | alpaca (training.formats)
    shard_bytes: int
    seq_len: int  # tokens per block


def check_request(model_dir: Path | str, data: list[Path | str], out_dir: Path | str, options: TrainOptions) -> Request:
    model_dir = Path(model_dir)
    options.check()
    config = read_config(model_dir)
    manifest = read_manifest(model_dir)
    if options.train == "new" and (manifest is None or not manifest.trainable_layers):
        why = f"has no {MANIFEST_FILE}" if manifest is None else "has a manifest that lists no new layers"
        raise UsageError(
            f"{model_dir} {why}, so there are no new layers to train; train every parameter with --train all"
        )
    files = check_files(data, "--data")
    eval_files = check_files(options.eval_data, "--eval-data") if options.eval_data else []
    fmt = detect_format(files, options.text_field, options.format)
    if eval_files and (eval_fmt := detect_format(eval_files, options.text_field, options.format, "--eval-data")) != fmt:
        raise OptDeusError(
            f"the --eval-data files are {eval_fmt} but the --data files are {fmt}; evaluate on the same format"
        )
    check_options(fmt, options.loss_on, options.packing, options.chat_template, options.drop_long)
    OutputTransaction(out_dir, options.overwrite, model_dir).check()  # refusals before any work
    check_extra_globs([p for p in sorted(model_dir.iterdir()) if p.is_file()], options.copy_extra, model_dir)
    return Request(config, manifest, files, eval_files, fmt, parse_size(options.shard_size), _seq_len(options, config))


def check_checkpoint(model_dir: Path) -> None:
    """A truncated or broken safetensors named as upscale names it, not by transformers. Not in
    check_request: safetensors' reader brings torch, and usage errors come without it."""
    Checkpoint(model_dir).close()


def _seq_len(options: TrainOptions, config: dict) -> int:
    limit = config.get("max_position_embeddings")
    if options.seq_len is None:
        return min(1024, int(limit)) if limit else 1024
    if limit and options.seq_len > int(limit):
        raise UsageError(
            f"--seq-len {options.seq_len} exceeds the model's max_position_embeddings {limit}; choose at most {limit}"
        )
    return options.seq_len
