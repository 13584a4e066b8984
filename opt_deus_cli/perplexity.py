"""Perplexity of a local text file: the one implementation `opt-deus verify --text` and
`opt-deus eval --text` share.

The text is tokenized whole with the model's tokenizer (its special tokens as it adds them), then
scored in non-overlapping windows of at most `window` predicted tokens, each window seeing only
its own tokens (plus the last token of the previous window as its first input). The summed
next-token negative log-likelihood gives the token perplexity exp(nll / predicted tokens) and the
word perplexity exp(nll / words), words being the text's whitespace-separated pieces (how
lm-evaluation-harness normalises its word_perplexity, so figures of differently tokenized models
compare)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

MAX_WINDOW = 512  # predicted tokens per forward pass: bounded memory on long texts


@dataclass(frozen=True)
class TextTokens:
    path: str
    token_ids: list[int]  # the whole text, as the tokenizer encodes it
    words: int  # whitespace-separated pieces of the text


def tokenize_text(tokenizer_dir: Path | str, text_file: Path | str, option: str = "--text") -> TextTokens:
    """Read `text_file` and encode it with the tokenizer in `tokenizer_dir` (local files only)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise UsageError(
            f"{tokenizer_dir} has no usable tokenizer for {option} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    try:
        text = Path(text_file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {option} {text_file}: {e}") from e
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text is scored in windows: its length is no problem
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(ids) < 2 or not text.split():
        raise UsageError(f"{option} {text_file} has fewer than two tokens or no words")
    return TextTokens(str(text_file), list(ids), len(text.split()))


def context_window(config) -> int:
    """Predicted tokens per window: the model's context (a transformers config), at most MAX_WINDOW."""
    return min(int(getattr(config, "max_position_embeddings", None) or MAX_WINDOW), MAX_WINDOW)


def window_starts(text: TextTokens, window: int) -> range:
    """Where each window of the text starts (its length is the number of forward passes)."""
    return range(0, len(text.token_ids) - 1, window)


def text_perplexity(model, text: TextTokens, device, on_window=None) -> dict:
    """Token and word perplexity of `model` on `text`:
    {"file", "tokens" (predicted), "words", "nll" (summed, nats), "token_perplexity", "word_perplexity"}.
    on_window(), if given, is called before each window (progress)."""
    import torch

    window = context_window(model.config)
    ids = text.token_ids
    total, count = 0.0, 0
    with torch.no_grad():
        for start in window_starts(text, window):
            if on_window:
                on_window()
            chunk = torch.tensor(ids[start : start + window + 1], device=device)[None]  # (1, <= window + 1)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()  # (1, n, vocab)
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + chunk.shape[1] - 1
    return {
        "file": text.path,
        "tokens": count,
        "words": text.words,
        "nll": total,
        "token_perplexity": math.exp(total / count),
        "word_perplexity": math.exp(total / text.words),
    }
