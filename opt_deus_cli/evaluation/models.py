"""MODEL arguments of `opt-deus eval`, resolved before any scoring: a Hub repo id (through
opt_deus_cli.hub), an opt-deus output (its manifest), a training checkpoint (`checkpoint-N` from
`save_strategy`: its run and step) or any local model directory. Each gets the sha256 of its
weights (from its manifest where it has one, else computed) and the directory of the tokenizer it
is scored with. Nothing here writes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..hashing import hub_blob_sha256, sha256_file
from ..hub import resolve_model
from ..manifest import read_manifest

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors",)
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "training_args.bin")


@dataclass
class EvalModel:
    spec: str  # the MODEL argument as given
    path: Path  # where it lives on disk (a Hub snapshot for a repo id)
    kind: str  # "hub" | "output" (an opt-deus output) | "checkpoint" | "model"
    files: list[dict]  # the weights: {"name", "bytes", "sha256"}
    sha256_from: str  # "manifest" | "computed" | "hub cache"
    tokenizer_dir: Path | None = None  # None: no tokenizer of its own (a Trainer checkpoint)
    repo_id: str | None = None
    revision: str | None = None
    run: str | None = None  # a checkpoint's run: the directory holding its checkpoint-N siblings
    step: int | None = None  # a checkpoint's training step
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """What the results file records about this model."""
        return {
            "spec": self.spec,
            "path": str(self.path),
            "kind": self.kind,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "run": self.run,
            "step": self.step,
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir else None,
            "sha256_from": self.sha256_from,
            "files": self.files,
            "notes": self.notes,
        }


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _weights(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _checkpoint_step(directory: Path) -> int | None:
    """The training step of a Trainer checkpoint (trainer_state.json, else the directory name)."""
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    match = CHECKPOINT_DIR.fullmatch(directory.name)
    return int(match.group(1)) if match else None


def _check_directory(spec: str, directory: Path, checkpoint: bool) -> list[Path]:
    """The weight files of a model directory; a usage error (exit 2) when it cannot be scored."""
    what = "checkpoint directory" if checkpoint else "model directory"
    if not directory.is_dir():
        raise UsageError(f"MODEL {spec} is not a directory or a Hub repo id")
    weights = _weights(directory)
    if not weights:
        pickled = [name for name in PICKLED if (directory / name).is_file()]
        extra = (
            f" (only pickled {', '.join(pickled)}, which opt-deus never loads: save with safetensors)"
            if pickled
            else "; was it saved with save_only_model or without the model?"
            if checkpoint
            else ""
        )
        raise UsageError(
            f"{what} {directory} has no weights (*.safetensors){extra}; give a directory with the model's weights"
        )
    if not (directory / "config.json").is_file():
        raise UsageError(f"{what} {directory} has no config.json; give a Hugging Face model directory")
    return weights


def _file_entries(weights: list[Path]) -> tuple[list[dict], str]:
    """sha256 of weight files: a Hub cache names LFS blobs by it; others are hashed."""
    entries, source = [], "hub cache"
    for path in weights:
        digest = hub_blob_sha256(path)
        if digest is None:
            digest, source = sha256_file(path), "computed"
        entries.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest})
    return entries, source


def is_checkpoint(directory: Path | str) -> bool:
    """A Trainer checkpoint: named checkpoint-N, or holding trainer_state.json."""
    directory = Path(directory)
    return directory.is_dir() and (
        CHECKPOINT_DIR.fullmatch(directory.name) is not None or (directory / "trainer_state.json").is_file()
    )


def resolve_one(spec: str) -> EvalModel:
    resolved = resolve_model(spec)
    directory = Path(resolved.path)
    checkpoint = is_checkpoint(directory)
    step = _checkpoint_step(directory) if checkpoint else None
    weights = _check_directory(spec, directory, checkpoint)
    manifest = read_manifest(directory)
    recorded = {f.name: f.bytes for f in manifest.output.files} if manifest is not None else {}
    # the manifest's sha256 stand for the files when every weight file is recorded with its size
    # (`opt-deus verify` checks the hashes themselves); otherwise they are computed
    if manifest is not None and all(recorded.get(p.name) == p.stat().st_size for p in weights):
        files = [
            {"name": f.name, "bytes": f.bytes, "sha256": f.sha256}
            for f in manifest.output.files
            if f.name.endswith(WEIGHT_SUFFIXES)
        ]
        source = "manifest"
    else:
        files, source = _file_entries(weights)
    kind = "hub" if resolved.repo_id else "checkpoint" if checkpoint else "output" if manifest else "model"
    return EvalModel(
        spec=spec,
        path=directory,
        kind=kind,
        files=files,
        sha256_from=source,
        tokenizer_dir=directory if has_tokenizer(directory) else None,
        repo_id=resolved.repo_id,
        revision=resolved.revision,
        run=str(directory.resolve().parent) if checkpoint else None,
        step=step if checkpoint else None,
    )


def resolve_models(specs: list[str]) -> list[EvalModel]:
    """Every MODEL, checked before any is loaded. A model without a tokenizer of its own (a Trainer
    checkpoint: the Trainer saves none unless given one) is scored with the first MODEL's, said in
    its notes; the first MODEL must have one."""
    if not specs:
        raise UsageError("give at least one MODEL")
    models = [resolve_one(spec) for spec in specs]
    reference = models[0]
    if reference.tokenizer_dir is None:
        raise UsageError(
            f"the first MODEL {reference.spec} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "put a model with one first (the base): checkpoints without one are scored with its tokenizer"
        )
    for model in models[1:]:
        if model.tokenizer_dir is None:
            model.tokenizer_dir = reference.tokenizer_dir
            model.notes.append(f"no tokenizer of its own: scored with {reference.spec}'s")
    return models


def same_tokenizer(a: Path, b: Path) -> bool:
    """Do two tokenizer directories hold the same vocabulary files (byte for byte)?"""
    if Path(a).resolve() == Path(b).resolve():
        return True
    for name in ("tokenizer.json", "tokenizer.model"):
        pa, pb = Path(a) / name, Path(b) / name
        if pa.is_file() != pb.is_file() or (pa.is_file() and pa.read_bytes() != pb.read_bytes()):
            return False
    return True
