r"""Hand an up-scaled model to a trainer: a ready config, in each tool's own dialect, that trains
exactly the new layers (`opt-deus handoff OUT --for axolotl|llama-factory|peft|trainer`).

The manifest's `trainable_parameter_regex` is a Python regex meant for `re.match`; pasted into
another tool it means something else (issue 11). Each tool reads a selection its own way, so each
form below is written for that reading (the tests re-implement every rule from the tool's source
and check the selection against a real model's parameter names):

- axolotl, `unfrozen_parameters` (src/axolotl/utils/freeze.py, `LayerNamePattern`): every `.` not
  followed by `+` becomes a literal dot, then `re.match` against each name of
  `model.named_parameters()`. The escaped manifest regex `^model\.layers\.(?:4|6)\.` then asks
  for a backslash before each dot and selects nothing. Written: one plain prefix per new layer,
  `^model.layers.10.`; the trailing dot keeps layer 1 from selecting layers 10-19. For full
  fine-tuning (no `adapter:`: with LoRA the names gain a `base_model.model.` prefix).
- LLaMA-Factory, `finetuning_type: freeze` + `use_llama_pro: true`
  (src/llamafactory/model/adapter.py, `_setup_freeze_tuning`): with N = `freeze_trainable_layers`
  it trains layers `stride-1, 2*stride-1, ..., num_layers-1` (stride = num_layers / N, which must
  divide) and unfreezes a parameter when the substring `.{layer}.{module}` occurs in its name.
  Written only when that stride gives exactly our new layers, else UsageError. Modules `all`,
  except for mixtures of experts under transformers 4: there an expert index is a `.{k}.` too and
  `all` would also unfreeze expert k of every layer, so the block's own children are listed, by
  their transformers-4 names (mixtral's `block_sparse_moe`, which transformers 5 renamed `mlp`: a
  name of the other major stops LLaMA-Factory with "Module ... is not found"). Under 5 the experts
  are stacked parameters without an index, and `all` selects exactly the new layers. LLaMA-Factory
  0.9.5 accepts transformers 4.55 to 5.6, so the major is the one installed, or `--transformers`.
- PEFT, `LoraConfig` (src/peft/tuners/tuners_utils.py, `check_target_module_exists`): a module is
  wrapped when its name ends with `.{target}` and, with `layers_to_transform`, the number after
  `.{layers_pattern}.` is listed. `layers_pattern="layers"` is set because without it older PEFT
  takes the last number in the name (an expert index). Mixtures of experts differ by transformers
  version: in 4 the experts are Linear modules (`w1`..., added to `target_modules`); in 5 they are
  stacked 3-D parameters that PEFT reaches only through `target_parameters`, which ignores
  `layers_to_transform` (and PEFT rewrites expert names in `target_modules` into such suffixes,
  i.e. every layer), so the new layers' expert parameters are listed by full name.
- trainer: a transformers `Trainer` script around `opt_deus_cli.training.freeze_base`, which sets
  `requires_grad` from the manifest itself.

Pure functions from plain data to text: no torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import OptDeusError, UsageError

DIALECTS = ("axolotl", "llama-factory", "peft", "trainer")

OTHER_ROUTES = "--for axolotl (unfrozen_parameters), --for peft (LoRA) or --for trainer (transformers Trainer)"


@dataclass(frozen=True)
class HandoffTarget:
    """What a handoff needs to know about an up-scaled model."""

    model_dir: str
    model_type: str
    num_layers: int  # output depth
    new_layers: tuple[int, ...]  # output indices of the layers to train (the manifest's trainable_layers)
    layers_prefix: str = "model.layers."
    # leaf names of the Linear modules LoRA adapts outside experts (q_proj ..., phi3's qkv_proj)
    projection_modules: tuple[str, ...] = ()
    # leaf names of the experts' Linear modules under transformers 4 (mixtral: w1, w3, w2)
    expert_modules: tuple[str, ...] = ()
    # the children of a block that hold parameters, as the checkpoint (= transformers 4) names them
    block_modules: tuple[str, ...] = ()
    # major version of the transformers the training runs with (only mixtures of experts differ)
    transformers_major: int = 5
    # transformers >= 5: the experts' stacked parameters, relative to the block (the family's
    # Architecture.stacked_experts; checked against the real models by tests/test_handoff.py)
    stacked_experts: tuple[str, ...] = ()

    def __post_init__(self):
        layers = tuple(self.new_layers)
        object.__setattr__(self, "new_layers", layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers for i in layers) or list(
            layers
        ) != sorted(set(layers)):
            raise OptDeusError(f"new layers {list(layers)} are not distinct increasing indices below {self.num_layers}")

    @property
    def has_experts(self) -> bool:
        return bool(self.expert_modules)

    @property
    def layers_pattern(self) -> str:
        """`layers` for `model.layers.`: the name part PEFT reads the layer index after."""
        return self.layers_prefix.rstrip(".").rsplit(".", 1)[-1]


def target_from_output(out_dir: Path | str, transformers_major: int | None = None) -> HandoffTarget:
    """Build the target from an opt-deus output directory (its manifest and config.json) and the
    architecture table. transformers_major defaults to the installed transformers."""
    from .architectures import PROJECTION_ROLES, SUPPORTED
    from .manifest import read_manifest

    out = Path(out_dir)
    manifest = read_manifest(out, required=True)
    model_type, num_layers = manifest.base.model_type, manifest.output.num_layers
    if model_type not in SUPPORTED:
        raise OptDeusError(f"the manifest in {out}: model_type {model_type!r} is not one opt-deus knows")
    arch = SUPPORTED[model_type]
    depth = _read_json(out / "config.json").get(arch.depth_key)
    if depth != num_layers:
        raise OptDeusError(
            f"{out / 'config.json'} says {arch.depth_key} = {depth} but the manifest says "
            f"{num_layers} layers; the directory was changed after opt-deus wrote it"
        )
    projections: list[str] = []
    for role in PROJECTION_ROLES:
        path = arch.projections.get(role) or next((p for p, roles in arch.fused.items() if role in roles), None)
        if path and path.rsplit(".", 1)[-1] not in projections:
            projections.append(path.rsplit(".", 1)[-1])
    experts = tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p in arch.experts.values()))
    tensors = [
        *arch.projections.values(),
        *arch.fused,
        *arch.experts.values(),
        arch.router or "",
        *arch.norms,
        *arch.head_norms,
    ]
    block = tuple(dict.fromkeys(t.split(".", 1)[0] for t in tensors if t))
    if transformers_major is None:
        transformers_major = _installed_transformers_major()
    return HandoffTarget(
        str(out.resolve()),
        model_type,
        num_layers,
        tuple(manifest.trainable_layers),
        arch.layers_prefix,
        tuple(projections),
        experts,
        block,
        transformers_major,
        arch.stacked_experts,
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OptDeusError(f"{path} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptDeusError(f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise OptDeusError(f"{path} is not a JSON object")
    return data


def _installed_transformers_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 5


# ---- the dialects ----------------------------------------------------------------------------


def _q(text: str) -> str:
    """A double-quoted scalar: valid YAML and Python alike (json escaping)."""
    return json.dumps(text)


def _about(target: HandoffTarget) -> str:
    return (
        f"{len(target.new_layers)} new layers {list(target.new_layers)} of {target.model_dir} "
        f"({target.model_type}, {target.num_layers} layers)"
    )


def _require_new_layers(target: HandoffTarget) -> None:
    if not target.new_layers:
        raise UsageError(
            f"{target.model_dir} has no new layers (the manifest lists none); there is nothing to hand off"
        )


def axolotl(target: HandoffTarget) -> str:
    """axolotl YAML: base_model and unfrozen_parameters, one plain prefix per new layer."""
    _require_new_layers(target)
    patterns = [f"^{target.layers_prefix}{i}." for i in target.new_layers]
    lines = [
        f"# axolotl, full fine-tuning of only the {_about(target)}.",
        "# axolotl reads each entry as a regex whose dots are literal, matched at the start of every",
        "# parameter name; the trailing dot keeps layer 1 from selecting layers 10-19. No `adapter:` here.",
        f"base_model: {_q(target.model_dir)}",
        "unfrozen_parameters:",
        *[f"  - {_q(p)}" for p in patterns],
        "# add datasets, sequence_len, micro_batch_size, num_epochs, learning_rate, output_dir, ...",
    ]
    return "\n".join(lines) + "\n"


def llama_pro_layers(num_layers: int, trainable: int) -> list[int] | None:
    """The layers LLaMA-Factory's use_llama_pro trains for freeze_trainable_layers = trainable
    (None when it refuses: num_layers not divisible)."""
    if trainable < 1 or num_layers % trainable:
        return None
    stride = num_layers // trainable
    return list(range(stride - 1, num_layers, stride))


def llama_factory(target: HandoffTarget) -> str:
    """LLaMA-Factory YAML (freeze + use_llama_pro), or UsageError when its stride rule cannot
    select exactly the new layers."""
    _require_new_layers(target)
    n, new = len(target.new_layers), list(target.new_layers)
    selected = llama_pro_layers(target.num_layers, n)
    if selected != new:
        rule = (
            f"the {target.num_layers} layers are not divisible by {n}"
            if selected is None
            else f"for {target.num_layers} layers and freeze_trainable_layers {n} that is {selected}"
        )
        raise UsageError(
            f"LLaMA-Factory cannot train exactly the new layers {new}: use_llama_pro trains every "
            f"(num_layers/N)-th layer up to the last ({rule}); use {OTHER_ROUTES} instead, or up-scale "
            "with method copy, positions: uniform and a count dividing the base depth"
        )
    listed = target.has_experts and target.transformers_major < 5  # expert indices are `.{k}.` only in 4
    modules = ",".join(target.block_modules) if listed else "all"
    lines = [
        f"### LLaMA-Factory, freeze tuning of only the {_about(target)}",
        f"model_name_or_path: {_q(target.model_dir)}",
        "finetuning_type: freeze",
        "use_llama_pro: true",
        f"freeze_trainable_layers: {n}",
        f"freeze_trainable_modules: {modules}",
        "# add stage, do_train, dataset, template, output_dir, learning_rate, ...",
    ]
    if target.has_experts:
        lines.insert(
            -1,
            f"# written for transformers {target.transformers_major}"
            + (
                " (its module names): modules are listed, not `all`, since an expert index would match `.{layer}.` too"
                if listed
                else ": experts are stacked parameters without an index, so `all` selects only the new layers"
            ),
        )
    return "\n".join(lines) + "\n"


def peft_fields(target: HandoffTarget) -> dict:
    """The LoraConfig keyword arguments that select the new layers."""
    _require_new_layers(target)
    fields: dict = {"task_type": "CAUSAL_LM"}
    modules = list(target.projection_modules)
    if target.has_experts and target.transformers_major < 5:
        modules += list(target.expert_modules)
    fields["target_modules"] = modules
    fields["layers_to_transform"] = list(target.new_layers)
    fields["layers_pattern"] = target.layers_pattern
    if target.has_experts and target.transformers_major >= 5:
        if not target.stacked_experts:
            raise OptDeusError(f"no transformers-5 expert parameter names known for {target.model_type}")
        fields["target_parameters"] = [
            f"{target.layers_prefix}{i}.{p}" for i in target.new_layers for p in target.stacked_experts
        ]
    return fields


def peft(target: HandoffTarget) -> str:
    """A Python snippet: LoraConfig with target_modules, layers_to_transform, layers_pattern
    (and, for experts under transformers 5, target_parameters by full name)."""
    fields = peft_fields(target)
    args = [f"    {k}={json.dumps(v)}," for k, v in fields.items()]
    lines = [
        f"# PEFT LoRA on only the {_about(target)}.",
        "# PEFT wraps a module whose name ends with a target_modules entry and whose number after",
        f'# ".{fields["layers_pattern"]}." is in layers_to_transform.',
    ]
    if "target_parameters" in fields:
        lines += [
            f"# Written for transformers {target.transformers_major}: the experts are stacked parameters, adapted through",
            "# target_parameters (peft >= 0.17), which ignores layers_to_transform, hence the full names.",
        ]
    elif target.has_experts:
        lines.append(f"# Written for transformers {target.transformers_major}: the experts are Linear modules.")
    lines += [
        "from peft import LoraConfig, get_peft_model",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({_q(target.model_dir)})",
        "lora_config = LoraConfig(",
        *args,
        "    # r, lora_alpha, lora_dropout: your choice",
        ")",
        "model = get_peft_model(model, lora_config)",
        "model.print_trainable_parameters()",
    ]
    return "\n".join(lines) + "\n"


def trainer(target: HandoffTarget) -> str:
    """A Python script: load, freeze everything but the new layers (from the manifest), train."""
    _require_new_layers(target)
    lines = [
        f"# transformers Trainer on only the {_about(target)}.",
        "# freeze_base sets requires_grad from opt-deus-manifest.json; Trainer optimises only those parameters.",
        f"# Turnkey, with data loading and the check that base tensors stay bit-identical: opt-deus train {target.model_dir} --data FILES --out OUT",
        "import torch",
        "from transformers import AutoModelForCausalLM, Trainer, TrainingArguments",
        "",
        "from opt_deus_cli.training import freeze_base",
        "",
        f"model_dir = {_q(target.model_dir)}",
        "model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # float32 master weights",
        "trainable = freeze_base(model, model_dir)",
        'print(f"training {len(trainable)} parameter tensors")',
        "# with gradient_checkpointing=True also call model.enable_input_require_grads()",
        "train_dataset = ...  # your tokenized dataset",
        'args = TrainingArguments(output_dir=model_dir + "-trained")',
        "trainer = Trainer(model=model, args=args, train_dataset=train_dataset)",
        "trainer.train()",
        "trainer.save_model()  # in float32: cast the model to the checkpoint's dtype first to store it as it was",
    ]
    return "\n".join(lines) + "\n"


RENDERERS = {"axolotl": axolotl, "llama-factory": llama_factory, "peft": peft, "trainer": trainer}


def render(target: HandoffTarget, dialect: str) -> str:
    if dialect not in RENDERERS:
        raise UsageError(f"--for {dialect!r} not understood; use one of {', '.join(DIALECTS)}")
    return RENDERERS[dialect](target)


def handoff(out_dir: Path | str, dialect: str, transformers_major: int | None = None) -> str:
    """The text `opt-deus handoff OUT --for DIALECT` prints."""
    if dialect not in RENDERERS:  # before reading anything
        raise UsageError(f"--for {dialect!r} not understood; use one of {', '.join(DIALECTS)}")
    if transformers_major not in (None, 4, 5):
        raise UsageError(
            f"--transformers {transformers_major} not understood; use 4 or 5 (the major version of "
            "the transformers the training will run with)"
        )
    return render(target_from_output(out_dir, transformers_major), dialect)
