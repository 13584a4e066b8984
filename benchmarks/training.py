"""Small, dependency-free training utilities for the opt-deus quality studies.

Everything here runs offline on CPU:

* corpus      -- the running interpreter's standard-library ``*.py`` files, split
                 into train / held-out *by file* (so held-out text is never seen
                 in training, not even as a neighbouring chunk of the same file);
* tokenizer   -- byte-level BPE trained with the ``tokenizers`` library and
                 saved so ``transformers.AutoTokenizer.from_pretrained`` loads it;
* blocks      -- token stream -> fixed-length ``[n_blocks, block_len]`` tensors
                 plus a seeded batch sampler;
* train / heldout_loss -- AdamW + warmup/cosine loop that can freeze every
                 parameter except those matching a regex (used to train only
                 newly inserted layers after deepening).

Note: the corpus depends on the interpreter's stdlib, so a different Python
version gives a (slightly) different corpus; the split and cap are
deterministic for a given stdlib.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# --------------------------------------------------------------------------- corpus

# Directory names skipped anywhere under the stdlib: installed packages, the
# (huge) test suites, and code that is mostly data tables (codec maps, pydoc
# topic strings) which would teach the model little about Python.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
)
# Individual files larger than this are mostly data (e.g. unicode tables); skip.
MAX_FILE_BYTES = 256_000
DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_HELDOUT_FRACTION = 0.05


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _path_hash(rel_path: str, purpose: str) -> int:
    # Stable across processes/platforms (unlike builtin hash(), which is salted).
    # ``purpose`` salts the hash so the split ("split") and the size-cap
    # ordering ("order") are independent: otherwise a small cap would take the
    # lowest hashes first, i.e. mostly held-out files.
    return int.from_bytes(hashlib.sha256(f"{purpose}:{rel_path}".encode()).digest()[:8], "big")


def stdlib_paths(root: Path | None = None) -> list[str]:
    """Relative (posix) paths of candidate stdlib ``*.py`` files, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into excluded dirs;
        # also skip build config dirs like "config-3.11-x86_64-linux-gnu".
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            full = Path(dirpath) / name
            if full.stat().st_size > MAX_FILE_BYTES:
                continue
            out.append(full.relative_to(root).as_posix())
    return sorted(out)


def is_heldout(rel_path: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Deterministic by-file split: a file is held out iff its path hash falls
    in the lowest ``heldout_fraction`` of the 64-bit hash space."""
    return _path_hash(rel_path, "split") < heldout_fraction * 2**64


@dataclass
class Corpus:
    train: list[tuple[str, str]]  # (relative path, text)
    heldout: list[tuple[str, str]]

    @property
    def train_texts(self) -> list[str]:
        return [t for _, t in self.train]

    @property
    def heldout_texts(self) -> list[str]:
        return [t for _, t in self.heldout]


def _read_capped(root: Path, rels: list[str], max_bytes: int) -> list[tuple[str, str]]:
    """Read files in a fixed pseudo-random (path-hash) order until ``max_bytes``,
    so a cap keeps a diverse sample of the stdlib rather than, say, everything
    from ``asyncio`` to ``email``. Returned sorted by path."""
    files, total = [], 0
    for rel in sorted(rels, key=lambda r: _path_hash(r, "order")):
        if total >= max_bytes:
            break
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a handful of legacy-encoded files
            continue
        if text.strip():
            files.append((rel, text))
            total += len(text.encode("utf-8"))
    return sorted(files)


def load_corpus(
    max_bytes: int = DEFAULT_MAX_BYTES,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    root: Path | None = None,
) -> Corpus:
    """Split all candidate files by path hash first, then cap each split
    (train to ``(1 - heldout_fraction) * max_bytes``, held-out to the rest).

    Splitting before capping means a file's split never depends on the cap,
    and even a small cap yields a non-empty held-out set.
    """
    root = root or stdlib_root()
    rels = stdlib_paths(root)
    held = [r for r in rels if is_heldout(r, heldout_fraction)]
    train = [r for r in rels if not is_heldout(r, heldout_fraction)]
    return Corpus(
        train=_read_capped(root, train, int(max_bytes * (1 - heldout_fraction))),
        heldout=_read_capped(root, held, max(1, int(max_bytes * heldout_fraction))),
    )


# --------------------------------------------------------------------------- tokenizer

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE (GPT-2 style pre-tokenisation, so any byte string is
    encodable and decoding is lossless). ``<s>``/``</s>``/``<pad>`` get ids
    0/1/2; encoding with special tokens prepends ``<s>`` like LLaMA does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes always present
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int):
    """Wrap as a transformers fast tokenizer and write tokenizer.json +
    tokenizer_config.json (+ special_tokens_map) to ``out_dir``. Returns the
    wrapped tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode lossless for code
    )
    hf_tok.save_pretrained(str(out_dir))
    # transformers 5 writes its internal class name ("TokenizersBackend"); the
    # v4 name below loads in both v4 and v5 (v5 aliases it to the same class).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return hf_tok


def encode_documents(tok, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate documents as ``<s> doc </s> <s> doc </s> ...`` -> 1-D LongTensor."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    encs = tok.encode_batch(list(texts), add_special_tokens=False)
    ids: list[int] = []
    for e in encs:
        ids.append(bos)
        ids.extend(e.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- blocks


def make_blocks(ids: torch.Tensor, block_len: int) -> torch.Tensor:
    """1-D token stream [N] -> non-overlapping blocks [N // block_len, block_len]
    (the ragged tail is dropped). Each block is used as both input and label;
    the HF causal-LM loss shifts labels internally."""
    n = ids.numel() // block_len
    return ids[: n * block_len].view(n, block_len).clone()


def batch_sampler(n_blocks: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Infinite iterator of index tensors [batch_size]: a fresh seeded
    permutation per epoch, so every block is seen once per epoch and the
    sequence of batches depends only on (n_blocks, batch_size, seed)."""
    if n_blocks < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} blocks, have {n_blocks}")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n_blocks, generator=g)
        for i in range(0, n_blocks - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


# --------------------------------------------------------------------------- train / eval


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int = 16, device: str | torch.device = "cpu") -> float:
    """Mean next-token cross-entropy (nats/token) over all blocks [n, L].
    Blocks have equal length, so weighting batch means by batch size gives the
    exact token mean."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i : i + batch_size].to(device)
        total += model(input_ids=x, labels=x).loss.item() * x.shape[0]
        n += x.shape[0]
    model.train(was_training)
    return total / max(n, 1)


def set_trainable(model, trainable_regex: str | None) -> list[str]:
    """requires_grad=True exactly for parameters whose full name matches
    ``trainable_regex`` (re.search); all if None. Returns trainable names.
    Tied weights appear once in named_parameters() (under the embedding name)."""
    pat = re.compile(trainable_regex) if trainable_regex is not None else None
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(pat is None or bool(pat.search(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"trainable_regex {trainable_regex!r} matches no parameter")
    return names


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear 0->1 over ``warmup`` steps, then cosine 1->min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train(
    model,
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    trainable_regex: str | None = None,
    eval_every: int | None = None,
    device: str | torch.device = "cpu",
    warmup: int | None = None,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``model`` in place (fp32 recommended) and return a history dict:

    * ``eval_steps`` / ``heldout_loss``: held-out loss before training (step 0),
      every ``eval_every`` steps and after the last step;
    * ``train_loss``: per-step training loss (len == steps);
    * ``sec_per_step``: mean wall seconds of forward+backward+optimizer step
      (first step excluded as warm-up when steps > 1; evals not included);
    * ``trainable`` / ``n_trainable`` / ``n_params``.

    Leaves ``requires_grad`` as set by ``trainable_regex``. Deterministic for a
    given seed on CPU (sampler and any stochastic ops are seeded).
    """
    model.to(device)
    torch.manual_seed(seed)
    trainable = set_trainable(model, trainable_regex)
    params = [p for p in model.parameters() if p.requires_grad]
    # Standard practice: no weight decay on norms/biases (1-D tensors).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    eval_every = eval_every or max(1, steps // 10)
    sampler = batch_sampler(train_blocks.shape[0], batch_size, seed)

    hist = {
        "eval_steps": [0],
        "heldout_loss": [heldout_loss(model, heldout_blocks, eval_batch_size, device)],
        "train_loss": [],
        "step_seconds": [],
        "trainable": trainable,
        "n_trainable": sum(p.numel() for p in params),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if log:
        log(
            f"step 0: heldout {hist['heldout_loss'][0]:.4f} ({hist['n_trainable']}/{hist['n_params']} params trainable)"
        )
    model.train()
    for step in range(1, steps + 1):
        x = train_blocks[next(sampler)].to(device)  # [batch_size, block_len]
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        hist["step_seconds"].append(time.perf_counter() - t0)
        hist["train_loss"].append(loss.item())
        if step % eval_every == 0 or step == steps:
            hist["eval_steps"].append(step)
            hist["heldout_loss"].append(heldout_loss(model, heldout_blocks, eval_batch_size, device))
            model.train()
            if log:
                recent = hist["train_loss"][-eval_every:]
                log(
                    f"step {step}: train {sum(recent) / len(recent):.4f} heldout {hist['heldout_loss'][-1]:.4f} "
                    f"({hist['step_seconds'][-1]:.2f}s/step, lr {sched.get_last_lr()[0]:.2e})"
                )
    timed = hist["step_seconds"][1:] or hist["step_seconds"]
    hist["sec_per_step"] = sum(timed) / len(timed)
    return hist
