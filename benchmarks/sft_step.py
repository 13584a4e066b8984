"""Step time of supervised fine-tuning (TRL's SFTTrainer) against continued pre-training (packed
text, transformers' Trainer) in `opt-deus train`, new layers only, same tokens per step.

examples/tiny-llama (8 layers) is up-scaled with the shipped `top-half` recipe (8 -> 12 layers,
new 4, 6, 8, 10). Every arm trains it with the `opt-deus train` command (a child process per run)
on CPython standard-library sources (benchmarks/training.py's training split), batch x seq-len
tokens a step:

    cpt         the sources as text: packed blocks of exactly seq-len tokens
    sft-padded  prompt-completion rows of about seq-len tokens (a chunk of a source, its first half
                the prompt, the second the completion): padded batches, loss on the completion
    sft-packed  rows of about seq-len / 4 tokens, --packing (TRL's best-fit, padding-free) into
                seq-len rows

The records give the median seconds per optimizer step (the first, warm-up step left out) and the
tokens a step really held (padding left out); arms alternate and repeat, so drifting machine load
hits all alike.

    python -m benchmarks.sft_step [--steps 12] [--repeats 3] [--batch-size 8] [--seq-len 256] [--json]

Run it under the heavy-job lock on a quiet machine:
`flock /tmp/opt-deus-heavy.lock .venv/bin/python -m benchmarks.sft_step`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.train_step import SHIPPED, opt_deus

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-out" / "sft-step"
ARMS = ("cpt", "sft-padded", "sft-packed")


def prompt_completion_rows(texts: list[str], tokens_per_row: int, limit: int) -> list[dict]:
    """Chunks of `tokens_per_row` tokens of the sources (BOS and EOS take 2 more), each split
    at its middle token into prompt and completion."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - tokens_per_row + 1, tokens_per_row):
            chunk = ids[start : start + tokens_per_row]
            half = len(chunk) // 2
            rows.append({"prompt": tokenizer.decode(chunk[:half]), "completion": tokenizer.decode(chunk[half:])})
            if len(rows) == limit:
                return rows
    return rows


def prepare(work: Path, seq_len: int, rows_needed: int) -> tuple[Path, dict[str, Path]]:
    """The up-scaled model and each arm's data file (made once, reused by later runs)."""
    from benchmarks.training import load_corpus

    model = work / "tiny-llama-top"
    if not (model / "opt-deus-manifest.json").is_file():
        opt_deus("upscale", str(SHIPPED), "--recipe", "top-half", "--out", str(model), "--device", "cpu", "--overwrite")
    corpus = load_corpus(max_bytes=2_000_000)
    files = {
        "cpt": work / "stdlib-train.jsonl",
        "sft-padded": work / f"sft-{seq_len}.jsonl",
        "sft-packed": work / f"sft-{seq_len // 4}.jsonl",
    }
    contents = {
        "cpt": lambda: [{"text": text} for text in corpus.train_texts],
        "sft-padded": lambda: prompt_completion_rows(corpus.train_texts, seq_len - 2, rows_needed),
        "sft-packed": lambda: prompt_completion_rows(corpus.train_texts, seq_len // 4 - 2, 4 * rows_needed),
    }
    for arm, path in files.items():
        if not path.is_file():
            path.write_text("".join(json.dumps(row) + "\n" for row in contents[arm]()))
    return model, files


def run_once(model: Path, data: Path, arm: str, args, out: Path) -> dict:
    extra = ["--packing"] if arm == "sft-packed" else []
    result = opt_deus(
        "train",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--device",
        "cpu",
        "--cache-dir",
        str(WORK / "datasets-cache"),
        "--overwrite",
        "--json",
        *extra,
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model, files = prepare(WORK, args.seq_len, args.steps * args.batch_size)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for arm in ARMS:
            record = run_once(model, files[arm], arm, args, WORK / f"trained-{arm}")
            runs.setdefault(arm, []).append(record)
            print(f"repeat {repeat}: {arm}: {record['seconds_per_step']:.3f} s/step", file=sys.stderr)
    load_after = os.getloadavg()[0]
    rows = []
    for arm, records in runs.items():
        per_step = [r["seconds_per_step"] for r in records]
        tokens = records[0]["tokens"] / records[0]["steps"]
        rows.append(
            {
                "arm": arm,
                "seconds_per_step": statistics.median(per_step),
                "runs": per_step,
                "tokens_per_step": tokens,
                "loss_tokens_per_step": records[0]["loss_tokens"] / records[0]["steps"],
                "tokens_per_second": tokens / statistics.median(per_step),
                "trainable_parameters": records[0]["trainable_parameters"],
            }
        )
    cpt = next(r for r in rows if r["arm"] == "cpt")
    for row in rows:
        row["vs_cpt"] = row["seconds_per_step"] / cpt["seconds_per_step"]
    meta = {
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "torch_threads": records[0]["torch_threads"],
        "load_before": load_before,
        "load_after": load_after,
        "python": platform.python_version(),
        "versions": runs["sft-padded"][0]["versions"],
    }
    shutil.rmtree(WORK / "datasets-cache", ignore_errors=True)
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    print(
        f"load average {load_before:.2f} -> {load_after:.2f}; {args.steps} steps x {args.repeats} runs, "
        f"batch {args.batch_size} x {args.seq_len} tokens, new layers only ({cpt['trainable_parameters'] / 1e6:.2f}M trainable)"
    )
    print("| arm | tokens/step | loss tokens/step | s/step (median) | runs | tokens/s | vs cpt |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['arm']} | {row['tokens_per_step']:.0f} | {row['loss_tokens_per_step']:.0f} | {row['seconds_per_step']:.3f} | "
            f"{', '.join(f'{s:.3f}' for s in row['runs'])} | {row['tokens_per_second']:.0f} | {row['vs_cpt']:.2f} |"
        )


if __name__ == "__main__":
    main()
