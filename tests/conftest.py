"""Shared test helpers: tiny real architectures built with transformers and saved sharded, as a
user's would be; canonical blocks as methods see them; Hub-shaped checkpoints and a Hub cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from opt_deus_cli.architectures import PROJECTION_ROLES, SUPPORTED, HeadLayout
from opt_deus_cli.cli import app
from opt_deus_cli.methods.base import BuildContext
from opt_deus_cli.methods.opt_deus.settings import AlignmentSettings

ROOT = Path(__file__).resolve().parent.parent  # the checkout: tests may sit in subfolders of tests/
SHIPPED_MODEL = ROOT / "examples" / "tiny-llama"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny tensors: thread start-up costs more than it saves, and a shared machine makes it worse
torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def llama_shaped(arch) -> bool:
    """The family's block is LLaMA's (projection names, two norms, no fused tensors, no experts),
    up to q/k head norms and the sliding-window key."""
    return dataclasses.replace(arch, model_type="llama", head_norms=(), window_layers_key=None) == SUPPORTED["llama"]


# every family opt-deus supports (a new one is one SUPPORTED entry): the LLaMA-shaped ones, the rest
FAMILIES = tuple(name for name, arch in SUPPORTED.items() if llama_shaped(arch))
MORE_FAMILIES = tuple(name for name in SUPPORTED if name not in FAMILIES)
MOE_FAMILIES = tuple(name for name, arch in SUPPORTED.items() if arch.experts)
# what a tiny model of a family needs beyond the shared sizes
FAMILY_KWARGS = {
    "gemma2": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=8),
    "gemma3_text": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
}


def make_model(
    path: Path,
    model_type: str,
    layers: int = 6,
    tied: bool = False,
    dtype=torch.bfloat16,
    shard: str | None = "60KB",
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a random tiny model of a family (GQA: 4 query heads, 2 KV heads) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=97,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    kwargs.update(FAMILY_KWARGS.get(model_type, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so averaging and copying are visible
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def checkpoint_tensors(model_dir) -> dict:
    """Every tensor of a checkpoint directory (all its safetensors shards), by name."""
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(model_type, **kw) -> path; cached per argument set for the session."""
    cache: dict = {}

    def get(model_type: str = "llama", **kw) -> Path:
        key = (model_type, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp(model_type), model_type, **kw)
        return cache[key]

    return get


# ---- markers: `pytest -m "not slow"` is the quick loop ----------------------------------------
# end to end: builds checkpoints, runs the pipeline or the CLI, loads models with transformers
E2E_FIXTURES = {"model_factory", "hub_model_factory"}
E2E_MODULES = {
    "test_cli",
    "test_bad_models",
    "test_bad_recipes",
    "test_output_safety",
    "test_determinism",
    "test_verify",
    "test_inspect",
    "test_quality",
    "test_benchmark_training",
}


def pytest_collection_modifyitems(items):
    for item in items:  # a module's own name, wherever it sits under tests/
        if E2E_FIXTURES & set(item.fixturenames) or item.module.__name__.rsplit(".", 1)[-1] in E2E_MODULES:
            item.add_marker(pytest.mark.slow)


# ---- canonical blocks, as methods see them (method tests) ------------------------------------

# GQA: 4 query heads in 2 KV groups of 2, head_dim 8
LAYOUT = HeadLayout(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate=48)
EXACT = AlignmentSettings()
SINKHORN = AlignmentSettings(solver="sinkhorn")
SHARP_SINKHORN = AlignmentSettings(solver="sinkhorn", epsilon=0.01)


def ctx(family: str, device: str = "cpu") -> BuildContext:
    return BuildContext(SUPPORTED[family], LAYOUT, torch.device(device))


def random_block(family: str, seed: int, dtype=torch.float32, layout: HeadLayout = LAYOUT) -> dict:
    """A block as the pipeline hands it over: relative names -> tensors."""
    arch = SUPPORTED[family]
    g = torch.Generator().manual_seed(seed)
    block = {arch.weight(r): 0.1 * torch.randn(layout.weight_shape(r), generator=g) for r in PROJECTION_ROLES}
    if family == "qwen2":
        for r in ("q", "k", "v"):
            block[arch.bias(r)] = 0.1 * torch.randn(layout.weight_shape(r)[0], generator=g)
    for name in arch.norms:
        block[name] = 1 + 0.3 * torch.randn(layout.hidden, generator=g)
    for name in arch.head_norms:
        block[name] = 1 + 0.3 * torch.randn(layout.head_dim, generator=g)
    return {n: t.to(dtype) for n, t in block.items()}


def planted_permutation(block: dict, family: str, seed: int, layout: HeadLayout = LAYOUT) -> dict:
    """An allowed re-ordering of a block (the function it computes is unchanged): KV groups,
    query heads within each group, value dims within each KV head with the o_proj columns of
    all its query heads following, MLP neurons across gate/up rows, biases and down columns."""
    arch = SUPPORTED[family]
    g = torch.Generator().manual_seed(seed)
    roles = layout.random_allowed_permutation(g)
    neurons = roles["gate"][1]
    assert not torch.equal(neurons, torch.arange(layout.intermediate))
    moves = {arch.weight(role): move for role, move in roles.items()}  # name -> (dim, index)
    moves.update({arch.bias(role): roles[role] for role in ("q", "k", "v")})
    out = {}
    for name, t in block.items():
        dim, index = moves.get(name, (0, None))
        out[name] = t.index_select(dim, index) if index is not None else t.clone()
    return out


def assert_blocks_close(got: dict, want: dict, atol: float, rtol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].device.type == "cpu", name
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def check_report(report: dict) -> None:
    json.dumps(report, allow_nan=False)
    for group in ("attention", "mlp"):
        for key in (
            "solver",
            "epsilon",
            "iterations",
            "marginal_error",
            "converged",
            "cost_before",
            "cost_after",
            "permutation_likeness",
            "seconds",
        ):
            assert key in report[group], (group, key)
    assert isinstance(report["notes"], list)


# ---- Hub-shaped checkpoints (issue 10) ----------------------------------------------------------
# Configs as the Hub ships them (mostly saved by transformers 4.x: `torch_dtype`, no `layer_types`,
# family defaults omitted), shrunk; see tests/fixtures/hub_configs/README.md.

HUB_CONFIGS = Path(__file__).parent / "fixtures" / "hub_configs"
HUB_FIXTURES = tuple(sorted(p.stem for p in HUB_CONFIGS.glob("*.json")))
# file names whose blobs the Hub stores in LFS (named by sha256); the rest are plain git blobs
HUB_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".model")


def hub_config(fixture_name: str) -> dict:
    """The fixture's config.json as published (shrunk), parsed."""
    import json

    return json.loads((HUB_CONFIGS / f"{fixture_name}.json").read_text())


def make_hub_model(
    path: Path, fixture_name: str, seed: int = 0, shard: str | None = "60KB", config_overrides: dict | None = None
) -> Path:
    """A tiny random checkpoint whose config.json is the fixture file, byte for byte.

    The weights come from the model transformers builds from that config, with 1-D weights (norms,
    biases) moved away from their init, saved by `save_pretrained` (HF names, shards + index, the
    fixture's `torch_dtype`, no lm_head.weight when the embeddings are tied); only the
    *.safetensors files and the index are kept, so no config writer adds `layer_types` or defaults.
    `config_overrides` (keys set on top of the fixture; the file is then re-serialised, not
    verbatim) is for tests that isolate one difference from the published file."""
    import json
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM

    raw = hub_config(fixture_name)
    source = HUB_CONFIGS / f"{fixture_name}.json"
    if config_overrides:
        raw.update(config_overrides)
        source = Path(tempfile.mkdtemp()) / "config.json"
        source.write_text(json.dumps(raw, indent=2) + "\n")
    dtype = getattr(torch, raw.get("torch_dtype") or raw.get("dtype") or "float32")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_dir, saved = Path(tmp) / "config", Path(tmp) / "saved"
        config_dir.mkdir()
        shutil.copyfile(source, config_dir / "config.json")
        config = AutoConfig.from_pretrained(config_dir)  # as a user's transformers reads it
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # norms (and biases) away from their init so copies and averages show
            for p in model.parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        model = model.to(dtype)
        model.save_pretrained(saved, max_shard_size=shard) if shard else model.save_pretrained(saved)
        for file in saved.iterdir():
            if file.name.endswith(".safetensors") or file.name == "model.safetensors.index.json":
                shutil.copyfile(file, path / file.name)
    shutil.copyfile(source, path / "config.json")  # verbatim: the published key set, nothing added
    if config_overrides:
        shutil.rmtree(source.parent)
    return path


def _git_blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(
    cache_root: Path, repo_id: str, model_dir: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """Lay `model_dir`'s files out as huggingface_hub's cache holds a downloaded repo:
    `models--org--name/blobs/<etag>` (sha256 of the content for LFS files such as *.safetensors,
    the git blob sha1 for plain files such as config.json and the index), relative symlinks
    `snapshots/<revision>/<file> -> ../../blobs/<etag>`, and `refs/main` holding the revision.
    Returns the snapshot directory."""
    import hashlib
    import os

    repo = Path(cache_root) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(Path(model_dir).rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        lfs = file.name.endswith(HUB_LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (blobs / etag).write_bytes(data)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blobs / etag, link.parent), link)
    (repo / "refs" / "main").write_text(revision)  # no trailing newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="session")
def hub_model_factory(tmp_path_factory):
    """hub_model_factory(fixture_name, seed=0, **config_overrides) -> path; built once per argument set."""
    cache: dict = {}

    def get(fixture_name: str, seed: int = 0, **config_overrides) -> Path:
        key = (fixture_name, seed, tuple(sorted((k, repr(v)) for k, v in config_overrides.items())))
        if key not in cache:
            cache[key] = make_hub_model(
                tmp_path_factory.mktemp(fixture_name.replace(".", "_")),
                fixture_name,
                seed,
                config_overrides=config_overrides or None,
            )
        return cache[key]

    return get


# ---- end of hub-shaped checkpoints ---------------------------------------------------------------


# ---- the command line as a user runs it (test_bad_models, test_bad_recipes, test_output_safety,
# test_determinism): one-line refusals, what is left at an output, damaged checkpoints --------
runner = CliRunner()
OPT_DEUS = str(Path(sys.executable).parent / "opt-deus")
INDEX = "model.safetensors.index.json"
MANIFEST = "opt-deus-manifest.json"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def upscale(model, out, *extra, recipe="llama-pro"):
    return cli("upscale", model, "--recipe", recipe, "--out", out, "--device", "cpu", *extra)


# a plain progress line (stderr is not a terminal here): "[5/12 3s] layer 4 (new: ...)"
PROGRESS_LINE = re.compile(r"\[(\d+/\d+ )?\d+s( eta \d+s)?\] ")


def messages(stderr: str) -> list[str]:
    """stderr without its progress lines: what the run had to say."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


def refused(result, code: int, *fragments: str) -> str:
    """The run failed with exit `code` and exactly one line on stderr besides progress, `error: ...`."""
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """What is at or beside OUT_DIR: the directory itself, temporary directories, the lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def fake_result(out: Path) -> dict[str, str]:
    """An existing opt-deus output (as far as --overwrite cares) whose survival is checked."""
    out.mkdir()
    (out / "opt-deus-manifest.json").write_text("{}\n")
    (out / "model.safetensors").write_bytes(b"the old result")
    return snapshot(out)


@pytest.fixture
def model(model_factory, tmp_path) -> Path:
    """A private copy of the tiny sharded llama (6 layers, 2 shards) that a test may damage."""
    return Path(shutil.copytree(model_factory("llama"), tmp_path / "model"))


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def edit_tensors(model_dir: Path, edit) -> None:
    """Rewrite every shard with edit(name, tensor) -> tensor, or None to drop the tensor."""
    index_path = model_dir / INDEX
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        kept = {}
        for name, tensor in tensors.items():
            new = edit(name, tensor)
            if new is None:
                del index["weight_map"][name]
            else:
                kept[name] = new
        save_file(kept, str(model_dir / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def shard_holding(model_dir: Path, tensor: str) -> Path:
    return model_dir / json.loads((model_dir / INDEX).read_text())["weight_map"][tensor]


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (the data section is kept as it is)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + size :])


class Unpickled:
    """Unpickling this runs code (touches a file): it proves opt-deus never unpickles."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in ("timings", "seconds")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def result_of(out: Path) -> tuple[dict, dict]:
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "opt-deus-manifest.json"}
    return files, without_timings(json.loads((out / "opt-deus-manifest.json").read_text()))
