"""Training data: text, json/jsonl and parquet files -> one `datasets.Dataset` of packed blocks.

Each file is read with the `datasets` builder for its format (plain text: one document per file,
so line breaks stay in the text; json/jsonl/parquet: one document per row, from a text column),
the documents are concatenated in the order the files were given, tokenized with the model's
tokenizer (its special tokens, and an end-of-sequence token after each document when the tokenizer
has one) and cut into blocks of exactly `seq_len` tokens (input_ids (seq_len,); the tail shorter
than a block is dropped, per map batch of 1000 documents, as transformers' run_clm example does).
Where the tokenizer starts a sequence with BOS, every block starts with it (see `pack_stream`).
Labels are the inputs: the model shifts them itself."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptDeusError, UsageError

# file suffix -> datasets builder; a compression suffix may follow (datasets decompresses)
FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
MAP_BATCH = 1000  # documents per tokenize/pack batch


@dataclass(frozen=True)
class DataFile:
    """A data file as the training record names it."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> DataFile:
        from ..checkpoint import sha256_file

        return cls(str(path.resolve()), path.stat().st_size, sha256_file(path))


def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    builder = FORMATS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise UsageError(
            f"cannot tell the format of {path} from its name; use .txt/.md (plain text, "
            "one document per file), .json/.jsonl, .parquet or .csv (a text column, --text-field)"
        )
    return builder


def check_files(paths: list[Path | str], what: str) -> list[Path]:
    """The data files, each an existing file of a known format (before any expensive work)."""
    files = [Path(p) for p in paths]
    if not files:
        raise UsageError(f"no {what} files given")
    for path in files:
        if path.is_dir():
            known = sorted({p.suffix.lower() for p in path.iterdir() if p.suffix.lower() in FORMATS})
            example = " ".join(f"{path}/*{suffix}" for suffix in known) or f"{path}/*.txt"
            raise UsageError(f"{what} {path} is a directory; give its files, e.g. {what} {example}")
        if not path.is_file():
            raise UsageError(f"{what} file {path} does not exist")
        file_format(path)
    return files


def read_file(path: Path, cache_dir: Path | None = None):
    """One file as a Dataset, read by the `datasets` builder of its format (plain text: one row)."""
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()  # our own progress bar reports the run
    datasets.logging.set_verbosity_error()
    builder = file_format(path)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return load_dataset(
            builder,
            data_files=[str(path.resolve())],
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
            **kwargs,
        )
    except Exception as e:  # datasets raises many kinds for a malformed file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if builder == "text" and _caused_by(e, UnicodeDecodeError):  # datasets says only "An error occurred ..."
            raise OptDeusError(f"{path} is not UTF-8 text (a binary file?); .txt/.md data must be plain text") from e
        raise OptDeusError(f"cannot read {path} as {builder}: {first}") from e


def load_documents(files: list[Path], text_field: str, cache_dir: Path | None = None):
    """One Dataset with a single `text` column: every document of every file, in order."""
    from datasets import concatenate_datasets

    parts = []
    for path in files:
        part = read_file(path, cache_dir)
        column = "text" if file_format(path) == "text" else text_field
        if column not in part.column_names:
            raise OptDeusError(
                f"{path} has no '{column}' column (it has {', '.join(part.column_names) or 'none'}); "
                f"name the text column with --text-field"
            )
        if part.features[column].dtype not in ("string", "large_string"):  # csv (through pandas) reads large_string
            raise OptDeusError(f"{path}: column '{column}' holds {part.features[column].dtype}, not text")
        part = part.select_columns([column])
        parts.append(part.rename_column(column, "text") if column != "text" else part)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def bos_of(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every sequence with it (an `add_bos_token` flag or a
    post-processor template: asked of the tokenizer itself), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def pack_stream(stream: list[int], seq_len: int, bos: int | None) -> list[list[int]]:
    """A token stream -> blocks of exactly seq_len tokens (the tail shorter than a block dropped).

    With a BOS, every block begins with it. transformers' run_clm gives BOS per document only (the
    tokenizer's), so every block but a document's first would start mid-text: a model trained with
    BOS at position 0 (Gemma's attention sink: 2.7-3.2 nats with it, 4.1-4.9 without, issue 25)
    would train on inputs it never saw. So a block that starts at a document's own BOS takes
    seq_len stream tokens, any other gets BOS prepended to seq_len - 1: tokens per block stay
    seq_len, no BOS is doubled, and no stream token is repeated or skipped."""
    if bos is None:
        usable = len(stream) // seq_len * seq_len
        return [stream[i : i + seq_len] for i in range(0, usable, seq_len)]
    blocks, start = [], 0
    while start < len(stream):
        if stream[start] == bos:
            end = start + seq_len
            block = stream[start:end]
        else:
            end = start + seq_len - 1
            block = [bos, *stream[start:end]]
        if end > len(stream):
            break
        blocks.append(block)
        start = end
    return blocks


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def tokenize_and_pack(documents, tokenizer, seq_len: int):
    """documents (`text` column) -> Dataset of `input_ids` blocks, each exactly seq_len tokens."""
    from transformers.utils import logging as hf_logging

    eos, bos = tokenizer.eos_token_id, bos_of(tokenizer)

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": [doc + [eos] if eos is not None else doc for doc in ids]}

    def pack(batch: dict) -> dict:
        return {"input_ids": pack_stream([token for doc in batch["input_ids"] for token in doc], seq_len, bos)}

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # documents longer than the model's context are cut into blocks below
    try:
        tokens = documents.map(tokenize, batched=True, batch_size=MAP_BATCH, remove_columns=["text"])
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokens.map(pack, batched=True, batch_size=MAP_BATCH)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptDeusError(
            f"{model_dir} has no usable tokenizer ({first}); copy the base model's tokenizer files into it"
        ) from e


def build_blocks(
    paths: list[Path],
    tokenizer,
    seq_len: int,
    text_field: str,
    what: str,
    first=nullcontext,
    cache_dir: Path | None = None,
):
    """Files -> packed blocks; `first` is a context manager under which the main process goes
    first in a distributed run (its cache is then reused by the others)."""
    with first():
        blocks = tokenize_and_pack(load_documents(paths, text_field, cache_dir), tokenizer, seq_len)
    if len(blocks) == 0:
        raise OptDeusError(
            f"the {what} ({', '.join(map(str, paths))}) holds fewer tokens than one block of "
            f"--seq-len {seq_len}; give more text or a smaller --seq-len"
        )
    return blocks.with_format("torch")


def collate_blocks(features: list[dict]) -> dict:
    """Blocks of equal length -> input_ids (batch, seq_len) and labels (the same ids)."""
    import torch

    ids = torch.stack([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}
