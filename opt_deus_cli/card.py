"""The output's README.md: a model card of its own (huggingface_hub's ModelCard), never the base's.
Its metadata names the base model (`base_model`: a Hub repo id, left out for a local base, whose
path the body names), the licence the base's card declares, tags and the library; its body says
what was done, which layers are new, how to train only them and how to check it, in commands whose
paths run as written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .manifest import LayerEntry

CARD_FILE = "README.md"


def base_license(base_dir: Path) -> str | None:
    """The `license:` of the base's own card, when it has one (unreadable cards are ignored)."""
    from huggingface_hub import ModelCard

    path = Path(base_dir) / CARD_FILE
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # a card with broken metadata: the deeper model simply has no licence line
        return None


def model_card(
    *,
    base_repo_id: str | None,
    base_dir: Path,
    model_type: str,
    recipe: dict,
    layers: list[LayerEntry],
    new_layers: list[int],
    function_preserving: bool,
    out_dir: Path,
    tool_version: str,
):
    from huggingface_hub import ModelCard, ModelCardData

    method = recipe["method"]
    # how the commands below name the base and the output: a repo id (verify resolves it to the
    # commit the manifest records) or an absolute path, so they run from any directory
    base_name = base_repo_id or str(Path(base_dir).resolve())
    out_name, out_path = Path(out_dir).name, str(Path(out_dir).absolute())
    data = ModelCardData(
        base_model=base_repo_id,  # None: a local directory is no Hub id, and the key is left out
        license=base_license(base_dir),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["opt-deus", "depth-upscaling", method],
    )
    base_n = sum(1 for layer in layers if not layer.is_new)
    rows = "\n".join(
        f"| {layer.index} | {layer.origin} | {', '.join(map(str, layer.sources))} | {layer.method} | {start_summary(layer)} |"
        for layer in layers
    )
    post_norm_start = any(layer.start_values for layer in layers)
    how = (
        "the new layers' branches end in a norm, which starts at scale 0 (weight -1: the family scales by "
        "1 + w) with o_proj and down_proj kept as built, so the branches add zero and train from a sane start"
        if post_norm_start
        else "the new layers' output projections are zero"
    )
    preserving = (
        f"yes: {how}, so before training this model computes exactly what "
        f"{base_name} computes (`opt-deus verify` checks the logits)"
        if function_preserving
        else "no: this recipe changes what the model computes until it is trained"
    )
    body = f"""
# {out_name}

{base_repo_id or f"The local model `{base_name}`"} ({model_type}) made deeper with [opt-deus](https://pypi.org/project/opt-deus-cli/) {tool_version}:
{base_n} -> {len(layers)} decoder layers, method `{method}`. New layers: {new_layers}.
Function-preserving at initialisation: {preserving}.

The new layers are initialised, not trained: train them (continued pre-training or fine-tuning)
before use. `opt-deus-manifest.json` beside the weights records every layer's origin, the
recipe and the checksums of the base and of these files.

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```

## Layers

| layer | origin | from base layers | method | set at the start |
|---|---|---|---|---|
{rows}

## Training only the new layers

```bash
opt-deus train {out_path} --data corpus.txt --out {out_path}-trained   # your data; transformers Trainer, base layers frozen
opt-deus handoff {out_path} --for axolotl          # or llama-factory, peft, trainer: a ready config
```

## Checking it

```bash
opt-deus verify {base_name} {out_path}   # add --text FILE for both models' perplexity on a text of yours
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def start_summary(layer: LayerEntry) -> str:
    """The tensors a new layer sets at the start, and to what: `self_attn.o_proj.weight = 0`;
    all experts' tensors once (`experts.*`)."""
    values = {name: 0.0 for name in layer.zeroed} | (layer.start_values or {})
    by_value: dict[float, list[str]] = {}
    for name, value in values.items():
        rel = re.sub(r"\.\d+\.", ".*.", name.split(f"layers.{layer.index}.", 1)[-1])  # experts.3. -> experts.*.
        if rel not in by_value.setdefault(value, []):
            by_value[value].append(rel)
    return "; ".join(f"{', '.join(names)} = {value:g}" for value, names in by_value.items()) or "-"


def trained_card(*, model_dir: Path, out_dir: Path, record: dict, tool_version: str):
    """The card of a trained output: what it was trained from and on, how long, the losses and what
    was frozen (the full record is in the manifest, or opt-deus-training.json)."""
    from huggingface_hub import ModelCard, ModelCardData

    source = str(Path(model_dir).resolve())
    data = ModelCardData(
        license=base_license(model_dir),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["opt-deus", "depth-upscaling", "trained"],
    )
    losses = [row["loss"] for row in record["history"] if "loss" in row]
    if record["train"] == "new":
        what = (
            f"only the new layers {record['trainable_layers']} ({record['trainable_parameters']:,} of "
            f"{record['total_parameters']:,} parameters); every other tensor was frozen and is checked "
            f"bit-identical to the input's ({record['check']['frozen_identical']} tensors)"
        )
    else:
        what = f"every parameter ({record['total_parameters']:,})"
    loss_line = f"first {losses[0]:.4f}, final {losses[-1]:.4f}" if losses else "not logged"
    if record.get("eval_loss") is not None:
        loss_line += f"; eval loss {record['eval_loss']:.4f}"
    rows = "\n".join(f"| {d['path']} | {d['bytes']} | {d['sha256']} |" for d in record["data"])
    eval_rows = "\n".join(f"| {d['path']} (eval) | {d['bytes']} | {d['sha256']} |" for d in record["eval_data"])
    warnings = "".join(f"\n**Warning:** {w}\n" for w in record.get("divergence", []))
    body = f"""
# {Path(out_dir).name}

The model `{source}` trained with [opt-deus](https://pypi.org/project/opt-deus-cli/) {tool_version}
(transformers {record["versions"]["transformers"]}): {record["steps"]} steps on {record["format"]} data,
{record["tokens"]:,} tokens seen ({record["loss_tokens"]:,} carrying loss), learning rate {record["learning_rate"]:g},
seed {record["seed"]}, world size {record["world_size"]}.

Trained: {what}.

Training loss: {loss_line}.
{warnings}
This model is trained: it no longer computes what its base computes. The full training record
(history, settings, versions) is in `opt-deus-manifest.json` (or `opt-deus-training.json`).

## Data

| file | bytes | sha256 |
|---|---|---|
{rows}{chr(10) + eval_rows if eval_rows else ""}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
