"""Issue 25, item 4: every packed block of continued pre-training starts the way the model expects.
With a tokenizer that starts sequences with BOS, each block of `opt-deus train` begins with it,
holds exactly --seq-len tokens and, its leading BOS set aside, continues the token stream where the
previous block stopped; with a tokenizer that adds no BOS, blocks are plain slices of the stream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHIPPED_MODEL as SHIPPED
from opt_deus_cli.training.data import bos_of, build_blocks, check_files, load_tokenizer

TEXT = (SHIPPED / "heldout.txt").read_text()
DOCS = [TEXT[:700], TEXT[700:2500], TEXT[2500:2600], TEXT[2600:4000]]


def tokenizer_dir(tmp_path: Path, with_bos: bool) -> Path:
    """The shipped tokenizer, or the same with its BOS template removed (byte-level only)."""
    out = tmp_path / ("bos" if with_bos else "no-bos")
    out.mkdir()
    shutil.copy(SHIPPED / "tokenizer_config.json", out)
    spec = json.loads((SHIPPED / "tokenizer.json").read_text())
    if not with_bos:
        spec["post_processor"] = next(p for p in spec["post_processor"]["processors"] if p["type"] == "ByteLevel")
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def blocks_of(tmp_path: Path, tokenizer, seq_len: int) -> list[list[int]]:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    blocks = build_blocks(
        check_files([path], "--data"), tokenizer, seq_len, "text", "training data", cache_dir=tmp_path / "cache"
    )
    return [b["input_ids"].tolist() for b in blocks]


@pytest.mark.parametrize("seq_len", [16, 57])
def test_every_block_starts_with_bos_when_the_tokenizer_adds_one(tmp_path, seq_len):
    tokenizer = load_tokenizer(tokenizer_dir(tmp_path, with_bos=True))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert bos_of(tokenizer) == bos == 0
    stream = [t for d in DOCS for t in tokenizer(d)["input_ids"] + [eos]]
    assert stream.count(bos) == len(DOCS)  # the tokenizer's own BOS, once per document
    blocks = blocks_of(tmp_path, tokenizer, seq_len)
    assert blocks and all(len(b) == seq_len and b[0] == bos for b in blocks)
    # with each prepended BOS removed, the blocks are the stream from its start, nothing repeated or skipped
    rebuilt, position = [], 0
    for block in blocks:
        body = block if stream[position] == bos else block[1:]
        assert body == stream[position : position + len(body)]
        rebuilt += body
        position += len(body)
    assert rebuilt == stream[: len(rebuilt)] and len(stream) - len(rebuilt) < seq_len
    assert stream[0] == bos and blocks[0] == stream[:seq_len]  # the first block is the first document's own start
    # a document's BOS where a block starts is not doubled
    assert not any(b[1] == bos for b in blocks)


def test_blocks_are_plain_slices_when_the_tokenizer_adds_no_bos(tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir(tmp_path, with_bos=False))
    assert tokenizer.bos_token_id == 0 and bos_of(tokenizer) is None  # a BOS token exists but is not added
    stream = [t for d in DOCS for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    assert 0 not in stream
    assert blocks_of(tmp_path, tokenizer, 16) == [stream[i : i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
