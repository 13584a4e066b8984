"""Pretrain the tiny LLaMA-architecture model shipped in ``examples/tiny-llama``.

Trains a byte-level BPE tokenizer and a small GQA LLaMA from scratch on the
running Python's standard library (offline, CPU, 1 thread by default), then
saves a bf16 Hugging Face checkpoint that ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained`` load offline, plus ``heldout.txt`` (held-out
stdlib files for perplexity demos) and ``TRAINING.md`` / ``training.json``.

    .venv/bin/python -m benchmarks.pretrain            # full run (~15-20 min)
    .venv/bin/python -m benchmarks.pretrain --quick    # seconds; writes out/tiny-llama-quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks import training as T

REPO = Path(__file__).resolve().parent.parent

HELDOUT_TXT_BYTES = 48_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output dir (default examples/tiny-llama, or out/tiny-llama-quick with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=650)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--context", type=int, default=256, help="block length = max_position_embeddings")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-corpus-bytes", type=int, default=T.DEFAULT_MAX_BYTES)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument(
        "--eval-blocks", type=int, default=48, help="held-out blocks used for periodic evals (final eval uses all)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small corpus/model, few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.context, args.vocab_size = 20, 64, 512
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 64, 128, 4, 2
        args.max_corpus_bytes, args.eval_every, args.eval_blocks = 400_000, 10, 16
    if args.out is None:
        args.out = REPO / ("out/tiny-llama-quick" if args.quick else "examples/tiny-llama")
    return args


def heldout_sample(corpus: T.Corpus, max_bytes: int) -> tuple[str, list[str]]:
    """Whole held-out files (sorted by path) that fit into ``max_bytes``."""
    parts, names, size = [], [], 0
    for rel, text in corpus.heldout:
        n = len(text.encode("utf-8"))
        if size + n <= max_bytes:
            parts.append(text if text.endswith("\n") else text + "\n")
            names.append(rel)
            size += n + 1
    return "\n".join(parts), names


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    corpus = T.load_corpus(max_bytes=args.max_corpus_bytes)
    print(
        f"corpus: {len(corpus.train)} train files, {len(corpus.heldout)} held-out files "
        f"({sum(map(len, corpus.train_texts))} / {sum(map(len, corpus.heldout_texts))} chars)"
    )
    # Tokenizer sees only the training split, so held-out files stay unseen.
    tok = T.train_tokenizer(corpus.train_texts, args.vocab_size)
    T.save_tokenizer(tok, out, model_max_length=args.context)

    train_blocks = T.make_blocks(T.encode_documents(tok, corpus.train_texts), args.context)
    heldout_blocks = T.make_blocks(T.encode_documents(tok, corpus.heldout_texts), args.context)
    # Periodic evals use an evenly spaced, fixed subset to keep them cheap.
    idx = torch.linspace(0, heldout_blocks.shape[0] - 1, min(args.eval_blocks, heldout_blocks.shape[0])).long()
    eval_blocks = heldout_blocks[idx]
    print(
        f"blocks: train {tuple(train_blocks.shape)}, held-out {tuple(heldout_blocks.shape)}; "
        f"one epoch = {train_blocks.shape[0] // args.batch_size} steps"
    )

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(T.BOS),
        eos_token_id=tok.token_to_id(T.EOS),
        pad_token_id=tok.token_to_id(T.PAD),
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)  # fp32 for training

    t_train = time.time()
    hist = T.train(
        model,
        train_blocks,
        eval_blocks,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        log=lambda s: print(s, flush=True),
    )
    train_seconds = time.time() - t_train
    final_heldout_fp32 = T.heldout_loss(model, heldout_blocks)

    model.to(torch.bfloat16).save_pretrained(out)
    text, names = heldout_sample(corpus, HELDOUT_TXT_BYTES)
    (out / "heldout.txt").write_text(text)

    # Round-trip check: reload exactly as a user would, evaluate and sample.
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).float().eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    final_heldout_bf16 = T.heldout_loss(reloaded, heldout_blocks)
    torch.manual_seed(args.seed)
    prompt = "def "
    gen = reloaded.generate(
        **hf_tok(prompt, return_tensors="pt"),
        max_new_tokens=min(120, args.context - 8),
        do_sample=True,
        temperature=0.8,
        top_k=50,
    )
    sample = hf_tok.decode(gen[0], skip_special_tokens=True)
    print(f"sample:\n{sample}")

    n = 50 if len(hist["train_loss"]) >= 50 else len(hist["train_loss"])
    summary = {
        "command": " ".join(["python -m benchmarks.pretrain", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corpus": {
            "source": "CPython stdlib *.py (tests/encodings/pydoc_data/site-packages excluded), split by file hash",
            "train_files": len(corpus.train),
            "heldout_files": len(corpus.heldout),
            "train_tokens": int(train_blocks.numel()),
            "heldout_tokens": int(heldout_blocks.numel()),
        },
        "n_params": hist["n_params"],
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.context,
        "sec_per_step": hist["sec_per_step"],
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start,
        "initial_heldout_loss_subset": hist["heldout_loss"][0],
        "final_train_loss_last50_mean": sum(hist["train_loss"][-n:]) / n,
        "final_heldout_loss_fp32": final_heldout_fp32,
        "final_heldout_loss_bf16_reloaded": final_heldout_bf16,
        "history": {
            "eval_steps": hist["eval_steps"],
            "heldout_loss_subset": hist["heldout_loss"],
            "train_loss": hist["train_loss"],
        },
        "heldout_txt_files": names,
        "sample_prompt": prompt,
        "sample": sample,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    curve = "\n".join(f"| {s} | {l:.3f} |" for s, l in zip(hist["eval_steps"], hist["heldout_loss"]))
    (out / "TRAINING.md").write_text(f"""# tiny-llama

A {hist["n_params"] / 1e6:.2f}M-parameter LLaMA-architecture model ({args.layers} layers, hidden {args.hidden},
{args.heads} heads / {args.kv_heads} KV heads, head_dim {args.hidden // args.heads}, MLP {args.intermediate},
tied embeddings, context {args.context}, vocab {config.vocab_size} byte-level BPE) trained from scratch
on CPython {platform.python_version()}'s standard library source. Weights are stored in bf16.
It is a test fixture for opt-deus, not a useful language model.

Command (from the repo root, 1 CPU thread):

    {summary["command"]}

- seed {args.seed}, {args.steps} steps x {args.batch_size} x {args.context} tokens
  = {summary["tokens_seen"]:,} tokens (~{summary["tokens_seen"] / train_blocks.numel():.2f} epochs of
  {train_blocks.numel():,} training tokens); AdamW lr {args.lr}, warmup+cosine, wd 0.1, clip 1.0
- {summary["sec_per_step"]:.2f} s/step, training {train_seconds / 60:.1f} min, total {summary["total_seconds"] / 60:.1f} min
- final train loss (mean of last {n} steps): {summary["final_train_loss_last50_mean"]:.3f}
- final held-out loss, all {heldout_blocks.shape[0]} held-out blocks ({len(corpus.heldout)} files never seen in training):
  {final_heldout_fp32:.3f} (fp32), {final_heldout_bf16:.3f} (saved bf16 reloaded)

`heldout.txt` holds {len(names)} whole held-out files (~{len(text) // 1000} KB) for perplexity demos.
`training.json` has the full loss history.

Held-out loss during training ({eval_blocks.shape[0]}-block subset):

| step | held-out loss |
|---|---|
{curve}

Sample (prompt `{prompt}`, temperature 0.8, top-k 50):

```python
{sample}
```
""")
    print(
        f"saved to {out} in {summary['total_seconds']:.0f}s; held-out loss "
        f"{hist['heldout_loss'][0]:.3f} -> {final_heldout_fp32:.3f} (bf16 reloaded {final_heldout_bf16:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
