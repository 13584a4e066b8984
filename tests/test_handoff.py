"""`opt-deus handoff` (issue 11): each tool's own selection rule, re-implemented below from the
tool's source, applied to the text handoff prints, selects exactly the new layers of a real
up-scaled model: their parameters (axolotl, LLaMA-Factory) or their projections (PEFT).

Parameter names come from the real model twice: as transformers 5 (installed here) names them
after loading (`named_parameters`, `named_modules`), and as the checkpoint stores them, which is how
transformers 4 names them (the two differ for mixtures of experts: `block_sparse_moe.experts.3.w1`
in 4, a stacked `mlp.experts.gate_up_proj` in 5)."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import FAMILIES, MOE_FAMILIES, MORE_FAMILIES, load_model
from opt_deus_cli.errors import UsageError
from opt_deus_cli.handoff import DIALECTS, HandoffTarget, handoff, render, target_from_output
from opt_deus_cli.manifest import MANIFEST_FILE
from opt_deus_cli.recipe import parse_recipe
from opt_deus_cli.upscale import Options, upscale

ALL_FAMILIES = FAMILIES + MORE_FAMILIES
MOE = MOE_FAMILIES

# layouts of the new layers: (base depth, recipe) -> new layers of the output
LAYOUTS = {
    # LLaMA-Pro's layout, which LLaMA-Factory's stride accepts: 6 -> 9, new [2, 5, 8]
    "uniform": (6, {"method": "copy", "positions": "uniform", "count": 3}),
    # the paper's setting: 6 -> 9, new [3, 5, 7]; LLaMA-Factory cannot select it
    "top-half": (6, {"method": "copy", "positions": "top", "count": "50%"}),
    # layer 1 next to layer 10 (`model.layers.1` is a prefix of `model.layers.10`): 10 -> 12, new [1, 10]
    "one-and-ten": (10, {"method": "copy", "positions": [0, 8]}),
}
EXPECTED_NEW = {"uniform": [2, 5, 8], "top-half": [3, 5, 7], "one-and-ten": [1, 10]}

CASES = [(f, "uniform") for f in ALL_FAMILIES] + [
    ("llama", "top-half"),
    ("qwen3", "top-half"),
    ("gemma2", "top-half"),
    ("llama", "one-and-ten"),
    ("phi3", "one-and-ten"),
    ("mixtral", "one-and-ten"),
    ("qwen3_moe", "one-and-ten"),
]


class Upscaled:
    """A real up-scaled tiny model and the names each transformers generation gives its parts."""

    def __init__(self, out, manifest):
        self.out, self.manifest = out, manifest
        self.new = set(manifest["new_layers"])
        model = load_model(out)  # transformers 5: the names a trainer sees
        self.params = {n: p.dim() for n, p in model.named_parameters()}
        self.linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.modules = [n for n, _ in model.named_modules()]
        # module -> its own (non-recursive) parameter names, for PEFT's target_parameters rule
        self.own_params = {n: [p for p, _ in m.named_parameters(recurse=False)] for n, m in model.named_modules()}
        # the checkpoint's names = transformers 4 names (weights -> 2-D: a Linear unless an embedding/head)
        self.ckpt = {}
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                self.ckpt.update({k: len(f.get_slice(k).get_shape()) for k in f.keys()})
        self.ckpt_modules = sorted({k.rsplit(".", i)[0] for k in self.ckpt for i in range(1, k.count(".") + 1)})

    def in_new_layers(self, name: str) -> bool:
        parts = name.split(".")
        return name.startswith("model.layers.") and int(parts[2]) in self.new


@pytest.fixture(scope="session")
def upscaled(model_factory, tmp_path_factory):
    cache = {}

    def get(family: str, layout: str) -> Upscaled:
        if (family, layout) not in cache:
            depth, recipe = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"{family}-{layout}") / "out"
            upscale(model_factory(family, layers=depth), parse_recipe(dict(recipe)), out, Options(device="cpu"))
            manifest = json.loads((out / MANIFEST_FILE).read_text())  # as handoff reads it
            assert manifest["new_layers"] == EXPECTED_NEW[layout]
            cache[family, layout] = Upscaled(out, manifest)
        return cache[family, layout]

    return get


# ---- the tools' rules, re-implemented from their source ----------------------------------------


def axolotl_unfrozen(patterns: list[str], names, legacy: bool = False) -> set[str]:
    """axolotl-ai-cloud/axolotl, src/axolotl/utils/freeze.py (commit 107c67ae5a236ab458454e8daf3b77a98ce56867):
    freeze_layers_except(model, cfg.unfrozen_parameters) freezes every parameter, then unfreezes
    those whose name a LayerNamePattern matches. LayerNamePattern cuts a trailing `[start:end]`
    range off (r"^(.+)\\[([0-9]*)(?::([0-9]*))?\\]$"), turns every `.` not followed by `+` into
    `\\.` (re.sub(r"\\.(?!\\+)", "\\\\.", p); older versions: p.replace(".", "\\\\.")) and compiles
    it; match() is `re.match`, anchored at the start of the name only."""
    compiled = []
    for p in patterns:
        ranged = re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", p)
        base = ranged.group(1) if ranged else p
        compiled.append(re.compile(base.replace(".", "\\.") if legacy else re.sub(r"\.(?!\+)", "\\\\.", base)))
    return {n for n in names if any(c.match(n) for c in compiled)}


def llama_factory_trainable(cfg: dict, names) -> set[str]:
    """hiyouga/LLaMA-Factory, src/llamafactory/model/adapter.py `_setup_freeze_tuning` (commit
    01d87b8267b92bc0caacc746fa4f875e390b64e2; the same in the llamafactory 0.9.5 wheel on PyPI,
    which accepts transformers 4.55 to 5.6) with hparams/finetuning_args.py (modules split on
    commas). Copied, not called: llamafactory installs gradio, torchaudio, modelscope ... and pins
    accelerate and datasets below this project's. num_layers = config.num_hidden_layers; with use_llama_pro it must be divisible by
    N = freeze_trainable_layers, stride = num_layers // N, layers range(stride - 1, num_layers +
    stride - 1, stride). A module other than `all` must be in hidden_modules: the first name part
    after the first `.0.` (else `.1.`) of any parameter name. Trainable strings are
    `.{idx}.{module}` (`.{idx}.` for all); a parameter stays trainable when one of them is a
    substring of its name (no forbidden modules in a text-only model)."""
    assert cfg["finetuning_type"] == "freeze" and cfg["use_llama_pro"] is True
    num_layers, n = cfg["_num_layers"], cfg["freeze_trainable_layers"]
    if num_layers % n != 0:
        raise ValueError(f"`num_layers` {num_layers} should be divisible by `num_layer_trainable` {n}.")
    stride = num_layers // n
    layer_ids = range(stride - 1, num_layers + stride - 1, stride)
    hidden_modules = set()
    for name in names:
        if ".0." in name:
            hidden_modules.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden_modules.add(name.split(".1.")[-1].split(".")[0])
    trainable_layers = []
    for module in [m.strip() for m in str(cfg.get("freeze_trainable_modules", "all")).split(",")]:
        if module != "all" and module not in hidden_modules:
            raise ValueError(f"Module {module} is not found, please choose from {', '.join(hidden_modules)}")
        trainable_layers += [".{:d}.{}".format(i, module if module != "all" else "") for i in layer_ids]
    return {name for name in names if any(t in name for t in trainable_layers)}


def peft_module_matches(cfg: dict, key: str, greedy: bool = False) -> bool:
    """huggingface/peft, src/peft/tuners/tuners_utils.py `check_target_module_exists` (commit
    005fdd53c63ed5a27177fd200295a00f93a57b55), list form: a key in target_modules matches outright;
    else it must end with `.{target}`, and then, with layers_to_transform, the layer index is the
    group of re.match(rf".*?\\.{pattern}\\.(\\d+)\\.", key) (no pattern: r".*?\\.[^.]*\\.(\\d+)\\.");
    no index -> no match. Older PEFT used a greedy `.*` (the last number in the name): greedy=True."""
    targets = cfg["target_modules"]
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return True
    lead = ".*" if greedy else ".*?"
    patterns = cfg.get("layers_pattern")
    if not patterns:
        found = re.match(lead + r"\.[^.]*\.(\d+)\.", key)
    else:
        found = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(lead + rf"\.{pattern}\.(\d+)\.", key)
            if found:
                break
    if found is None:
        return False
    return int(found.group(1)) == layers if isinstance(layers, int) else int(found.group(1)) in layers


def peft_v5_moe_conversion(cfg: dict, model_type: str) -> dict:
    """huggingface/peft, src/peft/utils/transformers_weight_conversion.py `_convert_peft_config_moe`
    (commit 0e861fee73601e99c54f1ba432751dacced9488b), run by inject_adapter under transformers >= 5:
    for mixtral and models converted like qwen2_moe (transformers' _MODEL_TO_CONVERSION_PATTERN
    maps qwen3_moe there), target_modules entries equal to or ending in `.{old}` of the mapping
    move to target_parameters as the new short name; the others stay in target_modules."""
    mapping = {
        "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
        "qwen3_moe": {
            "gate": "gate.weight",
            "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj",
            "down_proj": "down_proj",
        },
    }.get(model_type)
    if mapping is None:
        return cfg
    cfg = dict(cfg)
    params, remaining = set(cfg.get("target_parameters") or []), set()
    for target in cfg["target_modules"]:
        new = next((v for k, v in mapping.items() if target == k or target.endswith(f".{k}")), None)
        (remaining.add(target) if new is None else params.add(new))
    cfg["target_modules"], cfg["target_parameters"] = sorted(remaining), sorted(params)
    return cfg


def peft_parameters_matched(cfg: dict, own_params: dict) -> set[str]:
    """Same PEFT version, BaseTuner._inject_parameters: for each module and each of its own
    parameters, key = f"{module}.{param}" is adapted when it is in target_parameters or ends with
    `.{target}`. layers_to_transform plays no part here."""
    targets = cfg.get("target_parameters") or []
    return {
        f"{m}.{p}"
        for m, ps in own_params.items()
        for p in ps
        if f"{m}.{p}" in targets or any(f"{m}.{p}".endswith(f".{t}") for t in targets)
    }


# ---- reading what handoff printed ------------------------------------------------------------


def lora_config_kwargs(snippet: str) -> dict:
    calls = [
        n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LoraConfig"
    ]
    assert len(calls) == 1
    return {kw.arg: ast.literal_eval(kw.value) for kw in calls[0].keywords}


def from_pretrained_paths(snippet: str) -> list[str]:
    tree = ast.parse(snippet)
    assigned = {
        t.id: n.value.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    paths = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained":
            arg = n.args[0]
            paths.append(arg.value if isinstance(arg, ast.Constant) else assigned[arg.id])
    return paths


# ---- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layout", CASES)
def test_axolotl_unfreezes_exactly_the_new_layers(upscaled, family, layout):
    m = upscaled(family, layout)
    cfg = yaml.safe_load(handoff(m.out, "axolotl"))
    assert cfg["base_model"] == str(m.out.resolve())
    for names in (m.params, m.ckpt):  # transformers 5 and 4 names
        expected = {n for n in names if m.in_new_layers(n)}
        assert expected and len(expected) < len(names)
        for legacy in (False, True):
            assert axolotl_unfrozen(cfg["unfrozen_parameters"], names, legacy) == expected


def test_manifest_regex_selects_nothing_in_axolotl(upscaled):
    """Issue 11 as reported: the manifest's escaped regex, pasted into unfrozen_parameters."""
    m = upscaled("llama", "one-and-ten")
    regex = m.manifest["trainable_parameter_regex"]
    assert {n for n in m.params if re.match(regex, n)} == {
        n for n in m.params if m.in_new_layers(n)
    }  # Python reads it right
    assert axolotl_unfrozen([regex], m.params) == set()


@pytest.mark.parametrize("family,layout", [c for c in CASES if c[1] == "uniform"])
def test_llama_factory_freezes_all_but_the_new_layers(upscaled, family, layout):
    m = upscaled(family, layout)
    num_layers = json.loads((m.out / "config.json").read_text())["num_hidden_layers"]
    # LLaMA-Factory 0.9.5 runs on transformers 4 or 5: each major's names (the checkpoint's are 4's;
    # transformers 5 renamed mixtral's block_sparse_moe to mlp and stacks the experts)
    for major, names in ((4, m.ckpt), (5, m.params)):
        cfg = yaml.safe_load(handoff(m.out, "llama-factory", transformers_major=major))
        assert cfg["model_name_or_path"] == str(m.out.resolve())
        cfg["_num_layers"] = num_layers
        assert llama_factory_trainable(cfg, names) == {n for n in names if m.in_new_layers(n)}, major
    if family in MOE:  # why the modules are listed for 4: with `all`, expert k of every layer matches `.k.`
        everything = dict(cfg, freeze_trainable_modules="all")
        assert llama_factory_trainable(everything, m.ckpt) > {n for n in m.ckpt if m.in_new_layers(n)}


def test_llama_factory_handoff_follows_the_installed_transformers(upscaled):
    """Without --transformers the names are those of the transformers installed (here 5), and the
    CLI option picks the other; a major that is neither is refused in one line."""
    from importlib.metadata import version

    from typer.testing import CliRunner

    from opt_deus_cli.cli import app

    m = upscaled("mixtral", "uniform")
    installed = int(version("transformers").split(".")[0])
    assert handoff(m.out, "llama-factory") == handoff(m.out, "llama-factory", transformers_major=installed)
    runner = CliRunner()
    for major, modules in (("4", "self_attn,block_sparse_moe,input_layernorm,post_attention_layernorm"), ("5", "all")):
        result = runner.invoke(app, ["handoff", str(m.out), "--for", "llama-factory", "--transformers", major])
        assert result.exit_code == 0 and yaml.safe_load(result.stdout)["freeze_trainable_modules"] == modules, (
            result.output
        )
    result = runner.invoke(app, ["handoff", str(m.out), "--for", "llama-factory", "--transformers", "3"])
    assert result.exit_code == 2 and "use 4 or 5" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("family,layout", [c for c in CASES if c[1] != "uniform"])
def test_llama_factory_refuses_layouts_its_stride_cannot_select(upscaled, family, layout):
    m = upscaled(family, layout)
    with pytest.raises(UsageError) as caught:
        handoff(m.out, "llama-factory")
    message = str(caught.value)
    assert "\n" not in message and str(m.manifest["new_layers"]) in message
    assert all(route in message for route in ("axolotl", "unfrozen_parameters", "peft", "trainer"))
    # and the refusal is right: no freeze_trainable_layers makes LLaMA-Factory select them
    n_layers = m.manifest["output"]["num_layers"]
    for n in range(1, n_layers + 1):
        cfg = {
            "finetuning_type": "freeze",
            "use_llama_pro": True,
            "freeze_trainable_layers": n,
            "_num_layers": n_layers,
        }
        try:
            chosen = llama_factory_trainable(cfg, m.params)
        except ValueError:
            continue
        assert chosen != {p for p in m.params if m.in_new_layers(p)}


@pytest.mark.parametrize("family,layout", CASES)
def test_peft_wraps_exactly_the_new_layers_projections(upscaled, family, layout):
    m = upscaled(family, layout)
    # transformers 5 (installed): live module and parameter names, after PEFT's own v5 rewrite
    snippet = handoff(m.out, "peft", transformers_major=5)
    assert from_pretrained_paths(snippet) == [str(m.out.resolve())]
    cfg = peft_v5_moe_conversion(lora_config_kwargs(snippet), family)
    expected_modules = {n for n in m.linear if m.in_new_layers(n)}
    expected_params = {n for n, dim in m.params.items() if dim == 3 and m.in_new_layers(n)}  # stacked experts
    assert bool(expected_params) == (family in MOE)
    for greedy in (False, True):
        assert {k for k in m.modules if peft_module_matches(cfg, k, greedy)} == expected_modules
    assert peft_parameters_matched(cfg, m.own_params) == expected_params
    # transformers 4: experts are Linear modules named as in the checkpoint (routers excluded)
    cfg4 = lora_config_kwargs(handoff(m.out, "peft", transformers_major=4))
    assert "target_parameters" not in cfg4
    expected4 = {
        k.rsplit(".", 1)[0]
        for k, dim in m.ckpt.items()
        if dim == 2 and k.endswith(".weight") and m.in_new_layers(k) and not k.endswith(".gate.weight")
    }
    for greedy in (False, True):
        assert {k for k in m.ckpt_modules if peft_module_matches(cfg4, k, greedy)} == expected4


def test_peft_expert_names_under_transformers5_reach_every_layer(upscaled):
    """Why experts go to target_parameters by full name: PEFT rewrites w1/w2/w3 into suffixes
    that ignore layers_to_transform, so LoRA would wrap the experts of every layer."""
    m = upscaled("mixtral", "uniform")
    naive = lora_config_kwargs(handoff(m.out, "peft", transformers_major=4))  # w1, w3, w2 in target_modules
    chosen = peft_parameters_matched(peft_v5_moe_conversion(naive, "mixtral"), m.own_params)
    assert {n.split(".")[2] for n in chosen} == {str(i) for i in range(m.manifest["output"]["num_layers"])}


def test_trainer_snippet_calls_freeze_base_on_the_output(upscaled):
    m = upscaled("qwen3", "top-half")
    snippet = handoff(m.out, "trainer")
    tree = ast.parse(snippet)
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("opt_deus_cli.training", "freeze_base") in imports and ("transformers", "Trainer") in imports
    calls = {getattr(n.func, "id", getattr(n.func, "attr", "")): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert [a.id for a in calls["freeze_base"].args] == ["model", "model_dir"]
    assert {kw.arg: getattr(kw.value, "id", None) for kw in calls["Trainer"].keywords}["model"] == "model"
    assert from_pretrained_paths(snippet) == [str(m.out.resolve())]


def test_target_from_output_reads_the_family(upscaled):
    phi3 = target_from_output(upscaled("phi3", "uniform").out)
    assert phi3.projection_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert phi3.new_layers == (2, 5, 8) and phi3.num_layers == 9 and not phi3.has_experts
    mixtral = target_from_output(upscaled("mixtral", "uniform").out, transformers_major=4)
    assert set(mixtral.expert_modules) == {"w1", "w2", "w3"} and "block_sparse_moe" in mixtral.block_modules


def test_usage_errors():
    target = HandoffTarget("/m", "llama", 8, (), projection_modules=("q_proj",))
    for dialect in DIALECTS:
        with pytest.raises(UsageError, match="no new layers"):
            render(target, dialect)
    with pytest.raises(UsageError, match="axolotl"):
        render(HandoffTarget("/m", "llama", 8, (3, 7)), "unsloth")
    assert "freeze_trainable_layers: 2" in render(HandoffTarget("/m", "llama", 8, (3, 7)), "llama-factory")


def test_cli_prints_the_dialect_verbatim_and_refuses_in_one_line(upscaled, model_factory, tmp_path):
    from typer.testing import CliRunner

    from opt_deus_cli.cli import app

    runner = CliRunner()
    m = upscaled("llama", "top-half")
    result = runner.invoke(app, ["handoff", str(m.out), "--for", "axolotl"])
    assert result.exit_code == 0 and result.stdout == handoff(m.out, "axolotl")
    result = runner.invoke(app, ["handoff", str(m.out), "--for", "peft", "--transformers", "4"])
    assert result.exit_code == 0 and result.stdout == handoff(m.out, "peft", transformers_major=4)
    for dialect, message in (
        ("llama-factory", "cannot train exactly the new layers"),
        ("unsloth", "--for 'unsloth' not understood"),
    ):
        result = runner.invoke(app, ["handoff", str(m.out), "--for", dialect])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    result = runner.invoke(app, ["handoff", str(model_factory("llama", layers=6)), "--for", "axolotl"])
    assert result.exit_code == 1 and "no opt-deus-manifest.json" in result.output
    # upscale's last line points here
    result = runner.invoke(
        app,
        [
            "upscale",
            str(model_factory("llama", layers=6)),
            "--recipe",
            "llama-pro",
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0 and "opt-deus handoff" in result.stdout.strip().splitlines()[-1]


def test_handoff_imports_no_torch(upscaled):
    """Printing a config is cheap: with torch made unimportable, every dialect renders."""
    import subprocess
    import sys

    out = upscaled("llama", "uniform").out
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from opt_deus_cli.handoff import DIALECTS, handoff\n"
        f"texts = [handoff({str(out)!r}, d) for d in DIALECTS]\n"
        "assert sys.modules['torch'] is None and all(texts)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
