"""The study's two corpora, written as the data files a user would give `opt-deus train`.

* in-domain: the running interpreter's standard-library `*.py` sources, split by file exactly as
  the shipped examples/tiny-llama was pretrained (benchmarks/training.py: same hash split, same
  10 MB cap), so its held-out files are unseen and its training files are the pretraining ones;
* new-domain: the C and C++ headers under /usr/include (`*.h`, at most 256 KB each, symlinks
  skipped, byte-identical duplicates dropped), split by file with the same hash rule. No part of
  the project trains on them (the tiny model saw only Python; its tokenizer was fitted to Python).

Each corpus becomes two jsonl files of documents (`{"text": ...}`):
* train.jsonl: every training-split file, whole (the tool packs them into blocks);
* eval.jsonl: a fixed held-out sample of `eval_tokens` tokens of the model's tokenizer, made of
  pieces of about EVAL_WINDOW_CHARS characters (whole lines) taken from as many held-out files as
  the size allows, beginning in the middle of each file (see eval_documents): licence headers and
  single large files do not dominate the measure.
The files depend only on the machine's files and the tokenizer; their sha256 goes into every
run's record (the training tool writes it), so runs can be checked to share their data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks import training as T

DOMAINS = ("in-domain", "new-domain")
HEADERS_ROOT = Path("/usr/include")
EVAL_WINDOW_CHARS = 1500


@dataclass(frozen=True)
class Corpus:
    """Where a domain's text comes from, as (relative path, text) pairs per split."""

    name: str
    description: str
    train: list[tuple[str, str]]
    heldout: list[tuple[str, str]]


def header_paths(root: Path) -> list[str]:
    """Relative paths of the headers under root, sorted; one path per distinct file content."""
    seen: set[str] = set()
    out = []
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.endswith(".h") or path.is_symlink() or path.stat().st_size > T.MAX_FILE_BYTES:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:  # the same header installed twice would leak across the split
                seen.add(digest)
                out.append(path.relative_to(root).as_posix())
    return sorted(out)


def load_corpus(domain: str, max_bytes: int = T.DEFAULT_MAX_BYTES) -> Corpus:
    if domain == "in-domain":
        c = T.load_corpus(max_bytes=max_bytes)
        return Corpus(
            domain, f"CPython {T.stdlib_root()} *.py (the shipped model's pretraining corpus)", c.train, c.heldout
        )
    if domain == "new-domain":
        if not HEADERS_ROOT.is_dir():
            raise SystemExit(
                f"the new-domain corpus is the C/C++ headers under {HEADERS_ROOT}, which this machine lacks"
            )
        rels = header_paths(HEADERS_ROOT)
        held = [r for r in rels if T.is_heldout(r)]
        train = [r for r in rels if not T.is_heldout(r)]
        cap = int(max_bytes * (1 - T.DEFAULT_HELDOUT_FRACTION))
        return Corpus(
            domain,
            f"C/C++ headers under {HEADERS_ROOT} ({len(rels)} distinct *.h files)",
            T._read_capped(HEADERS_ROOT, train, cap),
            T._read_capped(HEADERS_ROOT, held, max(1, max_bytes - cap)),
        )
    raise SystemExit(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")


def windows(text: str, size: int) -> list[str]:
    """The text as consecutive pieces of whole lines, each at most `size` characters (a longer
    line is a piece of its own), starting at the middle of the text and wrapping around to its
    start: the first piece of a file is its middle, not its licence header."""
    lines = text.splitlines(keepends=True)
    middle = len(lines) // 2
    pieces, current = [], ""
    for line in lines[middle:] + lines[:middle]:
        if current and len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def eval_documents(heldout: list[tuple[str, str]], count_tokens, eval_tokens: int) -> list[str]:
    """Pieces of the held-out files until they hold eval_tokens tokens: the first piece of every
    file (files in path-hash order), then the second piece of every file, and so on, so the sample
    spans as many files as its size allows."""
    per_file = [
        windows(text, EVAL_WINDOW_CHARS) for _, text in sorted(heldout, key=lambda item: T._path_hash(item[0], "eval"))
    ]
    docs, total = [], 0
    for depth in range(max(map(len, per_file), default=0)):
        for pieces in per_file:
            if total >= eval_tokens:
                return docs
            if depth < len(pieces):
                docs.append(pieces[depth])
                total += count_tokens(pieces[depth])
    if total < eval_tokens:
        raise SystemExit(f"the held-out split holds only {total} tokens; eval needs {eval_tokens}")
    return docs


def write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def prepare(
    domain: str, tokenizer_dir: Path, out: Path, eval_tokens: int, max_bytes: int = T.DEFAULT_MAX_BYTES
) -> dict:
    """Write out/{train,eval}.jsonl for a domain and a tokenizer (once: kept if present) and
    return what they hold."""
    info_path = out / "corpus.json"
    wanted = {"domain": domain, "tokenizer": str(tokenizer_dir), "eval_tokens": eval_tokens, "max_bytes": max_bytes}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in wanted} == wanted:
            return info
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"]) + 1  # + the end-of-document token

    corpus = load_corpus(domain, max_bytes)
    evals = eval_documents(corpus.heldout, count, eval_tokens)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [text for _, text in corpus.train])
    write_jsonl(out / "eval.jsonl", evals)
    info = wanted | {
        "description": corpus.description,
        "train_files": len(corpus.train),
        "train_bytes": sum(len(t.encode()) for _, t in corpus.train),
        "heldout_files": len(corpus.heldout),
        "eval_windows": len(evals),
        "eval_bytes": sum(len(t.encode()) for t in evals),
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info
