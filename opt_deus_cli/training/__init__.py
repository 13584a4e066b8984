"""Training an up-scaled model: only its new layers by default (issue 11).

    from opt_deus_cli.training import TrainOptions, freeze_base, train
    record = train("out/deeper", ["corpus.txt"], "out/trained", TrainOptions(steps=100, eval_data=("heldout.txt",)))

freeze  freeze_base(model, model_dir): requires_grad from the manifest's trainable layers
data    text/json/jsonl/parquet files -> tokenized blocks of --seq-len tokens (BOS first where the tokenizer adds one)
formats which data format a file holds (text, chat, prompt-completion, alpaca); its rows read and checked
sft     supervised fine-tuning on TRL's SFTTrainer / SFTConfig (imported on first use)
options TrainOptions and the --args file -> transformers TrainingArguments
request check_request(): every usage error of a run, before torch, transformers or datasets
run     train(): Trainer on the blocks, only rank 0 writes
save    the weights in the input's dtypes, the bit-identity check, the manifest's training record
distributed  rank 0's outcome sent to every rank

`train` imports transformers' Trainer: it is loaded on first use, so `freeze_base` stays light."""

from __future__ import annotations

from .freeze import freeze_base
from .options import TrainOptions

__all__ = ["TrainOptions", "freeze_base", "train"]


def __getattr__(name: str):
    if name == "train":
        from .run import train

        return train
    raise AttributeError(name)
