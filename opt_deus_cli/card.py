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


def model_card(*, base_repo_id: str | None, base_dir: Path, model_type: str, recipe: dict, layers: list[LayerEntry],
               new_layers: list[int], function_preserving: bool, out_dir: Path, tool_version: str):
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
    how = ("the new layers' branches end in a norm, which starts at scale 0 (weight -1: the family scales by "
           "1 + w) with o_proj and down_proj kept as built, so the branches add zero and train from a sane start"
           if post_norm_start else "the new layers' output projections are zero")
    preserving = (
        f"yes: {how}, so before training this model computes exactly what "
        f"{base_name} computes (`opt-deus verify` checks the logits)"
        if function_preserving else
        "no: this recipe changes what the model computes until it is trained"
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
