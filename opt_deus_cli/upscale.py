"""The main job: model directory + recipe -> deeper checkpoint + manifest.

Data flows one way: metadata (config + safetensors headers) -> validated plan -> for each
output layer in order: read its source blocks, build, zero-init, write -> config, side files,
manifest -> rename into place. At most two base blocks and one new block are in memory."""

from __future__ import annotations

import re
import shutil
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .architectures import (
    PROJECTION_ROLES, RESIDUAL_WRITERS, Architecture, HeadLayout, architecture_for, expected_block_shapes,
)
from .checkpoint import INDEX_FILE, PICKLE_SUFFIXES, Checkpoint, ShardWriter, TensorMeta, parse_size, sha256_file, write_json
from .configs import rewrite_config
from .errors import OptDeusError, UsageError
from .manifest import MANIFEST_FILE, FORMAT_VERSION, read_manifest
from .methods import make_method
from .methods.base import Block, BuildContext, Method
from .output import OutputTransaction
from .plan import OutputLayer, build_plan
from .recipe import Recipe

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# files of the base directory that are weights or are rewritten, hence not copied as they are
NOT_COPIED_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx") + PICKLE_SUFFIXES
NOT_COPIED_NAMES = {"config.json", INDEX_FILE, MANIFEST_FILE}

Progress = Callable[[str, int, int], None]  # (description, done, total)


@dataclass(frozen=True)
class Options:
    device: str = "auto"
    dtype: str = "keep"
    shard_size: str = "5GB"
    overwrite: bool = False
    allow_nonfinite: bool = False
    dry_run: bool = False


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec != "cpu" and not re.fullmatch(r"cuda(:\d+)?", spec):
        raise UsageError(f"--device {spec!r} not understood; use auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(spec)


@dataclass
class Job:
    """Everything decided before a byte is written."""

    ckpt: Checkpoint
    arch: Architecture
    layout: HeadLayout
    recipe: Recipe
    method: Method
    layers: list[OutputLayer]
    zero_roles: tuple[str, ...]
    dtype: torch.dtype | None
    device: torch.device
    blocks: dict[int, list[str]]  # base layer -> its tensor names, relative to the block
    pre: list[str]  # non-block tensors before the blocks (embeddings)
    post: list[str]  # non-block tensors after them (final norm, lm_head)

    @property
    def base_layers(self) -> int:
        return len(self.blocks)

    @property
    def new_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.is_new]

    @property
    def function_preserving(self) -> bool:
        """New layers are identities (both residual writers zeroed) and the base layers are
        kept in their order, so the deeper model computes what the base computed."""
        kept = [layer.sources[0] for layer in self.layers if not layer.is_new]
        return set(RESIDUAL_WRITERS) <= set(self.zero_roles) and kept == list(range(self.base_layers))

    def out_dtype(self, meta: TensorMeta) -> torch.dtype:
        return self.dtype if self.dtype is not None and meta.dtype.is_floating_point else meta.dtype

    def entries(self) -> list[tuple[str, TensorMeta]]:
        """Every output tensor with its dtype and shape, in writing order."""
        out = []
        for name in self.pre:
            meta = self.ckpt.meta(name)
            out.append((name, TensorMeta(self.out_dtype(meta), meta.shape)))
        for layer in self.layers:
            src = layer.sources[0]
            for rel in self.blocks[src]:
                meta = self.ckpt.meta(self.arch.layer_prefix(src) + rel)
                out.append((self.arch.layer_prefix(layer.index) + rel, TensorMeta(self.out_dtype(meta), meta.shape)))
        for name in self.post:
            meta = self.ckpt.meta(name)
            out.append((name, TensorMeta(self.out_dtype(meta), meta.shape)))
        return out

    def zeroed_names(self, layer: OutputLayer) -> list[str]:
        """Relative names of the tensors zero-initialised in a new layer (weights and biases)."""
        if not layer.is_new:
            return []
        block = set(self.blocks[layer.sources[0]])
        return [n for role in self.zero_roles for n in self.arch.role_tensors(role, self.layout) if n in block]

    def method_inputs(self, lower: Block, upper: Block | None, sources: tuple[int, ...]) -> tuple[Block, Block | None, BuildContext]:
        """Methods see canonical blocks (LLaMA names, fused tensors split) whatever the family;
        arch.from_canonical gives the family's own names back."""
        canonical = [self.arch.to_canonical(b, self.layout) if b is not None else None for b in (lower, upper)]
        return canonical[0], canonical[1], BuildContext(self.arch.canonical(), self.layout, self.device, sources)

    def trainable_regex(self) -> str:
        """Matches exactly the parameter names of the new layers."""
        if not self.new_layers:
            return "(?!)"
        alternatives = "|".join(str(i) for i in self.new_layers)
        return "^" + re.escape(self.arch.layers_prefix) + f"(?:{alternatives})\\."


def prepare(model_dir: Path | str, recipe: Recipe, options: Options) -> Job:
    """Read metadata, validate the checkpoint against its architecture, resolve the plan."""
    ckpt = Checkpoint(model_dir)
    arch = architecture_for(ckpt.config)
    layout = HeadLayout.from_config(ckpt.config, arch)
    try:
        n = ckpt.config[arch.depth_key]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise OptDeusError(f"config.json has no valid {arch.depth_key}")
    blocks, pre, post = _group_tensors(ckpt, arch, n)
    _check_blocks(ckpt, arch, layout, blocks)
    _check_outer(ckpt, layout)
    method = make_method(recipe)
    if arch.experts and not getattr(method, "supports_experts", False):
        raise UsageError(f"method {recipe.method} cannot build mixture-of-experts layers ({arch.model_type}) yet; "
                         "use copy, average or stack")
    zero_init = recipe.zero_init if recipe.zero_init is not None else method.default_zero_init
    zero_roles = []
    for short in zero_init:
        role = arch.role_of_short_name(short)
        if role is None:
            allowed = ", ".join(arch.projection_short_name(r) for r in PROJECTION_ROLES)
            raise UsageError(f"recipe {recipe.source}: zero_init names {short!r}, which is not a projection of {arch.model_type} ({allowed})")
        if not arch.zeroable(role):
            raise UsageError(f"recipe {recipe.source}: {short} is fused with other projections in {arch.model_type}; it cannot be zeroed alone")
        zero_roles.append(role)
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype!r} not understood; use {', '.join(DTYPES)}")
    layers = build_plan(recipe, n, method.needs_upper)
    return Job(ckpt, arch, layout, recipe, method, layers, tuple(zero_roles), DTYPES[options.dtype],
               resolve_device(options.device), blocks, pre, post)


def _group_tensors(ckpt: Checkpoint, arch: Architecture, n: int):
    blocks: dict[int, list[str]] = {i: [] for i in range(n)}
    pre, post = [], []
    for name in ckpt.names:
        split = arch.split_layer_name(name)
        if split is None:
            (pre if "embed" in name else post).append(name)
        elif split[0] >= n:
            raise OptDeusError(f"checkpoint has tensor {name} but config.json says {arch.depth_key} = {n}")
        else:
            blocks[split[0]].append(split[1])
    for i in blocks:
        blocks[i].sort()
    return blocks, sorted(pre), sorted(post)


def _check_blocks(ckpt: Checkpoint, arch: Architecture, layout: HeadLayout, blocks: dict[int, list[str]]) -> None:
    expected = expected_block_shapes(arch, layout)
    reference = set(blocks[0]) if blocks else set()
    for i, names in blocks.items():
        have = set(names)
        for rel, shape in expected.items():
            full = arch.layer_prefix(i) + rel
            if rel not in have:
                raise OptDeusError(f"tensor {full} is missing; the {arch.model_type} architecture needs it")
            got = ckpt.meta(full).shape
            if got != shape:
                raise OptDeusError(f"tensor {full} has shape {list(got)} but config.json implies {list(shape)}")
        for role in arch.projections:
            bias = arch.bias(role)
            if bias in have and ckpt.meta(arch.layer_prefix(i) + bias).shape != (layout.weight_shape(role)[0],):
                raise OptDeusError(f"tensor {arch.layer_prefix(i) + bias} has the wrong shape for its weight")
        if have != reference:
            raise OptDeusError(f"layer {i} has different tensors from layer 0: {sorted(have ^ reference)}")


def _check_outer(ckpt: Checkpoint, layout: HeadLayout) -> None:
    """The tensors around the blocks, named alike in every supported family: without them the
    output would load with random embeddings or head (transformers initialises what is missing)."""
    vocab = ckpt.config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise OptDeusError(f"config.json has no valid vocab_size (got {vocab!r})")
    expected = {"model.embed_tokens.weight": (vocab, layout.hidden), "model.norm.weight": (layout.hidden,)}
    if not ckpt.config.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = (vocab, layout.hidden)
    have = set(ckpt.names)
    for name, shape in expected.items():
        if name not in have:
            raise OptDeusError(f"tensor {name} is missing; the {ckpt.config['model_type']} architecture needs it")
        got = ckpt.meta(name).shape
        if got != shape:
            raise OptDeusError(f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}")


def describe_plan(job: Job, with_layers: bool = True) -> dict:
    """The resolved plan as plain data (for --dry-run and the manifest)."""
    plan = {
        "model_type": job.arch.model_type,
        "base_layers": job.base_layers,
        "output_layers": len(job.layers),
        "method": job.recipe.method,
        "new_layers": job.new_layers,
        "function_preserving": job.function_preserving,
        "zero_init": [job.arch.projection_short_name(r) for r in job.zero_roles],
        "device": str(job.device),
        "dtype": "keep" if job.dtype is None else str(job.dtype).removeprefix("torch."),
    }
    if with_layers:
        plan["layers"] = [
            {"index": layer.index, "origin": layer.origin, "sources": list(layer.sources), "method": layer.method}
            for layer in job.layers
        ]
    return plan


class BlockCache:
    """The last few base blocks read (the lower and upper neighbours of a new layer)."""

    def __init__(self, job: Job, size: int = 2):
        self.job, self.size, self._blocks = job, size, OrderedDict()

    def get(self, index: int) -> Block:
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        prefix = self.job.arch.layer_prefix(index)
        block = {rel: self.job.ckpt.read(prefix + rel) for rel in self.job.blocks[index]}
        self._blocks[index] = block
        if len(self._blocks) > self.size:
            self._blocks.popitem(last=False)
        return block


def _check_finite(block: Block, prefix: str, what: str) -> None:
    for rel, t in block.items():
        # min and max are finite iff every entry is (NaN propagates through both); one cheap pass
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            raise OptDeusError(f"{what} tensor {prefix}{rel} contains NaN or Inf; fix the checkpoint or pass --allow-nonfinite")


def build_new_layer(job: Job, layer: OutputLayer, cache: BlockCache, allow_nonfinite: bool) -> tuple[Block, dict]:
    lower = cache.get(layer.sources[0])
    upper = cache.get(layer.sources[1]) if len(layer.sources) > 1 else None
    if not allow_nonfinite:
        for src, block in zip(layer.sources, (lower, upper)):
            _check_finite(block, job.arch.layer_prefix(src), "source")
    block, report = job.method.build(*job.method_inputs(lower, upper, layer.sources))
    block = job.arch.from_canonical(block, job.layout)
    for rel in job.zeroed_names(layer):
        block[rel] = torch.zeros_like(block[rel])
    if not allow_nonfinite:
        _check_finite(block, job.arch.layer_prefix(layer.index), "built")
    return block, report


def upscale(model_dir: Path | str, recipe: Recipe, out_dir: Path | str, options: Options = Options(),
            progress: Progress | None = None) -> dict:
    """Run the job; returns the manifest (or the plan, with options.dry_run)."""
    started = time.perf_counter()
    job = prepare(model_dir, recipe, options)
    transaction = OutputTransaction(out_dir, options.overwrite, job.ckpt.dir)
    transaction.check()
    shard_bytes = parse_size(options.shard_size)
    if options.dry_run:
        return {"dry_run": True, "plan": describe_plan(job), "recipe": recipe.to_dict()}

    timings: dict[str, float] = {"plan": time.perf_counter() - started}
    if hasattr(job.method, "prepare"):  # methods that learn from the whole stack, before writing
        t0 = time.perf_counter()
        job.method.prepare(job, progress)
        timings["prepare"] = time.perf_counter() - t0
    hasher = ThreadPoolExecutor(max_workers=1)  # base checksums overlap the writing
    base_files = hasher.submit(lambda: [_file_entry(p) for p in job.ckpt.files()])
    layer_entries: list[dict] = []
    try:
        with transaction as tmp:
            t0 = time.perf_counter()
            writer = ShardWriter(tmp, job.entries(), shard_bytes)
            try:
                _write_tensors(job, writer, layer_entries, options, progress)
                writer.finish()
            finally:
                writer.abort()
            timings["tensors"] = time.perf_counter() - t0
            config, config_notes = rewrite_config(job.ckpt.config, job.arch, job.layers, job.dtype)
            write_json(tmp / "config.json", config)
            for path in job.ckpt.files():
                if path.name not in NOT_COPIED_NAMES and not path.name.endswith(NOT_COPIED_SUFFIXES):
                    shutil.copy2(path, tmp / path.name)
            t0 = time.perf_counter()
            base = base_files.result()
            timings["base_checksums_wait"] = time.perf_counter() - t0
            output_files = [_file_entry(p, writer.digests.get(p.name)) for p in sorted(tmp.iterdir())]
            timings["total"] = time.perf_counter() - started
            manifest = _manifest(job, base, output_files, layer_entries, config_notes, timings, out_dir)
            write_json(tmp / MANIFEST_FILE, manifest)
            transaction.commit()
    finally:
        hasher.shutdown(wait=False, cancel_futures=True)
    return manifest


def _write_tensors(job: Job, writer: ShardWriter, layer_entries: list[dict], options: Options, progress: Progress | None) -> None:
    cache = BlockCache(job)

    def copy_tensor(out_name: str, src_name: str) -> None:
        """A base tensor into the output unchanged: a byte copy, or a cast with --dtype."""
        meta = job.ckpt.meta(src_name)
        if job.out_dtype(meta) == meta.dtype:
            writer.copy_raw(out_name, meta, *job.ckpt.raw(src_name))
        else:
            writer.write(out_name, job.ckpt.read(src_name).to(job.out_dtype(meta)))

    total = len(job.layers)
    for name in job.pre:
        copy_tensor(name, name)
    for layer in job.layers:
        if progress:
            progress(f"layer {layer.index} ({layer.origin}: {layer.method} of {list(layer.sources)})", layer.index, total)
        t0 = time.perf_counter()
        prefix, src_prefix = job.arch.layer_prefix(layer.index), job.arch.layer_prefix(layer.sources[0])
        zeroed = job.zeroed_names(layer)
        entry = {"index": layer.index, "origin": layer.origin, "sources": list(layer.sources),
                 "method": layer.method, "zeroed": [prefix + rel for rel in zeroed]}
        if layer.is_new and not getattr(job.method, "copies_lower", False):
            block, report = build_new_layer(job, layer, cache, options.allow_nonfinite)
            for rel in job.blocks[layer.sources[0]]:
                writer.write(prefix + rel, block[rel].to(job.out_dtype(job.ckpt.meta(src_prefix + rel))))
            if report:
                entry["report"] = report
        else:  # a base layer, or a copy of one (LLaMA-Pro, SOLAR): bytes copied, zeroed tensors written
            if layer.is_new and not options.allow_nonfinite:
                _check_finite(cache.get(layer.sources[0]), src_prefix, "source")
            for rel in job.blocks[layer.sources[0]]:
                if rel in zeroed:
                    meta = job.ckpt.meta(src_prefix + rel)
                    writer.write(prefix + rel, torch.zeros(meta.shape, dtype=job.out_dtype(meta)))
                else:
                    copy_tensor(prefix + rel, src_prefix + rel)
        if layer.is_new:
            entry["seconds"] = round(time.perf_counter() - t0, 4)
        layer_entries.append(entry)
    for name in job.post:
        copy_tensor(name, name)
    if progress:
        progress("done", total, total)


def report_warnings(report: dict) -> list[str]:
    """What a method's report says went wrong: a plan that did not converge or lost mass."""
    found = []
    for group, figures in report.items():
        if isinstance(figures, dict):
            if figures.get("converged") is False:  # one line; the solver's own words are in the report
                found.append(f"{group} plan did not converge (iterations {figures.get('iterations')}, "
                             f"marginal error {figures.get('marginal_error', float('nan')):.2g})")
            else:
                found += [f"{group}: {w}" for w in figures.get("warnings", [])]
    return found


def _file_entry(path: Path, digest: tuple[int, str] | None = None) -> dict:
    size, sha = digest if digest else (path.stat().st_size, sha256_file(path))
    return {"name": path.name, "bytes": size, "sha256": sha}


def _manifest(job: Job, base_files, output_files, layer_entries, config_notes, timings, out_dir) -> dict:
    warnings = [f"layer {e['index']}: {w}" for e in layer_entries for w in report_warnings(e.get("report", {}))]
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "opt-deus", "version": __version__, "torch": torch.__version__},
        "base": {
            "path": str(job.ckpt.dir.resolve()),
            "model_type": job.arch.model_type,
            "num_layers": job.base_layers,
            "files": base_files,
        },
        "recipe": job.recipe.to_dict(),
        "resolved": describe_plan(job, with_layers=False),
        "function_preserving": job.function_preserving,
        "layers": layer_entries,
        "new_layers": job.new_layers,
        "trainable_parameter_regex": job.trainable_regex(),
        "config_notes": config_notes,
        "warnings": warnings,
        "output": {"path": str(Path(out_dir).absolute()), "num_layers": len(job.layers), "files": output_files},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "parent": read_manifest(job.ckpt.dir),
    }
