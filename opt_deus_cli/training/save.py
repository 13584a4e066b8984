"""After training: the weights in the input's own dtypes and names, written by rank 0 into a
transaction, then checked from the saved files before anything is renamed into place.

The check reads the input's and the output's safetensors: the same tensor names, shapes and
dtypes (so the output loads as the input did, tied embeddings stay tied), and with `--train new`
every tensor outside the trainable layers byte for byte equal to the input's. Frozen parameters
are never in the optimizer (so neither AdamW's step nor its weight decay reach them), and a
bf16 -> fp32 -> bf16 round trip is exact; the check is what makes both facts a guarantee."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .. import __version__
from ..card import CARD_FILE, trained_card
from ..checkpoint import INDEX_FILE, Checkpoint, sha256_file
from ..errors import OptDeusError
from ..manifest import MANIFEST_FILE, FileEntry, Manifest, OutputInfo
from ..output import OutputTransaction, copy_side_files, umask_modes
from ..shards import write_json

TRAINING_FILE = "opt-deus-training.json"  # the record, beside an output whose input had no manifest
CHUNK = 64 << 20  # bytes compared at a time


def gathered_state_dict(trainer) -> dict:
    """The full state dict, on every rank (FSDP and DeepSpeed ZeRO-3 gather it collectively;
    ZeRO-3 needs stage3_gather_16bit_weights_on_model_save)."""
    engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
    try:
        return trainer.accelerator.get_state_dict(engine)
    except ValueError as e:  # accelerate's refusal for ZeRO-3 without the gather setting
        raise OptDeusError(f"cannot gather the trained weights: {str(e).splitlines()[0]}") from e


def cast_like_input(state_dict: dict, input_ckpt: Checkpoint, model) -> dict:
    """Each tensor in the dtype the input stored it in (a name the checkpoint does not hold, such
    as transformers 5's stacked experts, takes the input's most common dtype). Tensors sharing
    storage (tied embeddings) stay shared, and tied aliases are dropped, so save_pretrained
    writes the tied weight once, as the input held it."""
    dtypes = [input_ckpt.meta(n).dtype for n in input_ckpt.names]
    common = max(set(dtypes), key=dtypes.count)
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # target -> source (transformers 5)
    cast, memo = {}, {}
    for name, tensor in state_dict.items():
        if name in tied and tied[name] in state_dict and name not in input_ckpt.names:
            continue
        dtype = input_ckpt.meta(name).dtype if name in input_ckpt.names else common
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), dtype)
        if key not in memo:
            memo[key] = tensor.detach().to("cpu", dtype)
        cast[name] = memo[key]
    return cast


def input_files(model_dir: Path) -> list[Path]:
    return [path for path in sorted(Path(model_dir).iterdir()) if path.is_file()]


def copy_input_files(model_dir: Path, out: Path, extra: tuple[str, ...] = ()) -> None:
    """config.json verbatim (the architecture and stored dtype are the input's) and the files that
    belong to the model (tokenizer, generation config, ...; and those --copy-extra names), over what
    save_pretrained wrote. Not the input's card: the output gets its own."""
    shutil.copy2(Path(model_dir) / "config.json", out / "config.json")
    copy_side_files(input_files(model_dir), out, {INDEX_FILE, MANIFEST_FILE, TRAINING_FILE, CARD_FILE}, extra)


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    fd_a, off_a, size = a.raw(name)
    fd_b, off_b, size_b = b.raw(name)
    if size != size_b:
        return False
    for start in range(0, size, CHUNK):
        n = min(CHUNK, size - start)
        if os.pread(fd_a, n, off_a + start) != os.pread(fd_b, n, off_b + start):
            return False
    return True


def check_saved(model_dir: Path, out: Path, is_frozen: Callable[[str], bool] | None) -> dict:
    """Compare the saved checkpoint with the input; raise OptDeusError on any difference that
    must not be. is_frozen(name) -> True for tensors that must be bit-identical (None: none)."""
    before, after = Checkpoint(model_dir), Checkpoint(out)
    try:
        missing, extra = sorted(set(before.names) - set(after.names)), sorted(set(after.names) - set(before.names))
        if missing or extra:
            raise OptDeusError(
                f"the saved checkpoint does not hold the input's tensors (missing {missing[:3]}, "
                f"extra {extra[:3]}); it would not load as the input does"
            )
        for name in before.names:
            if before.meta(name) != after.meta(name):
                raise OptDeusError(
                    f"tensor {name} was saved as {after.meta(name)} but the input holds {before.meta(name)}"
                )
        frozen = [n for n in before.names if is_frozen is not None and is_frozen(n)]
        moved = [n for n in frozen if not _same_bytes(before, after, n)]
        if moved:
            raise OptDeusError(
                f"base tensor {moved[0]} (and {len(moved) - 1} more) differs from the input after "
                f"training only the new layers: frozen weights moved, so nothing was written"
            )
        trained = [n for n in before.names if n not in set(frozen)]
        broken = [n for n in trained if not torch.isfinite(after.read(n).float()).all()]
        if broken:
            raise OptDeusError(
                f"tensor {broken[0]} (and {len(broken) - 1} more) holds NaN or Inf after training: "
                "the loss diverged (lower --lr); nothing was written"
            )
        return {
            "tensors": len(before.names),
            "frozen_identical": len(frozen),
            "trained_changed": sum(not _same_bytes(before, after, n) for n in trained),
        }
    finally:
        before.close()
        after.close()


def save_checked(
    model,
    state_dict: dict,
    model_dir: Path,
    directory: Path,
    shard_bytes: int,
    is_frozen: Callable[[str], bool] | None,
    copy_extra: tuple[str, ...] = (),
    phase: Callable[[str], None] = lambda name: None,
) -> dict:
    """Write the gathered weights into `directory` (the transaction's) in the input's dtypes, with
    the input's model files, and check them against the input; returns the check's counts."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    input_ckpt = Checkpoint(model_dir)
    try:
        weights = cast_like_input(state_dict, input_ckpt, model)
    finally:
        input_ckpt.close()
    phase("saving")
    model.save_pretrained(directory, state_dict=weights, max_shard_size=shard_bytes)
    del weights
    umask_modes(directory)  # safetensors writes 0600: what opt-deus writes follows the umask, as in upscale's output
    copy_input_files(model_dir, directory, copy_extra)  # copies keep the input's modes, as upscale's side files do
    phase("checking")
    return check_saved(model_dir, directory, is_frozen)


def write_output(
    model,
    state_dict: dict,
    model_dir: Path,
    out_dir: Path,
    overwrite: bool,
    shard_bytes: int,
    manifest: Manifest | None,
    is_frozen: Callable[[str], bool] | None,
    record: dict,
    copy_extra: tuple[str, ...] = (),
    phase: Callable[[str], None] = lambda name: None,
) -> dict:
    """Rank 0: save, check, record; OUT appears only when all of it succeeded. Returns the record
    with the check's counts."""
    transaction = OutputTransaction(out_dir, overwrite, model_dir)
    with transaction as tmp:
        check = save_checked(model, state_dict, model_dir, tmp, shard_bytes, is_frozen, copy_extra, phase)
        record = dict(record, check=check)
        trained_card(model_dir=model_dir, out_dir=out_dir, record=record, tool_version=__version__).save(
            tmp / CARD_FILE
        )
        if manifest is None:
            write_json(tmp / TRAINING_FILE, record)
        else:
            files = [FileEntry(p.name, p.stat().st_size, sha256_file(p)) for p in sorted(tmp.iterdir()) if p.is_file()]
            if manifest.training is not None:  # trained before: keep that record too
                record = dict(record, previous=manifest.training)
            carried = dataclasses.replace(
                manifest,
                output=OutputInfo(str(Path(out_dir).absolute()), manifest.output.num_layers, files),
                function_preserving=False,  # trained: no longer computes what the base computed
                training=record,
            )
            carried.write(tmp / MANIFEST_FILE)
        transaction.commit()
    return record


def json_safe(value):
    """The --args settings as JSON (a DeepSpeed config path, enums, ... become strings)."""
    return json.loads(json.dumps(value, default=str))
