"""The main job: model directory + recipe -> deeper checkpoint + manifest.

Data flows one way: metadata (config + safetensors headers) -> resolved job -> for each output
layer in order: read its source blocks, build, zero-init, write -> config, side files, manifest
-> rename into place. At most two base blocks and one new block are in memory."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from . import __version__
from .card import CARD_FILE, model_card
from .checkpoint import INDEX_FILE, TensorMeta, sha256_file
from .configs import rewrite_config
from .errors import UsageError
from .hashing import Hashing
from .hub import ResolvedModel, resolve_model
from .job import Job, resolve_job
from .layers import OutputLayer
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    BaseInfo,
    FileEntry,
    LayerEntry,
    Manifest,
    OutputInfo,
    read_manifest,
    report_warnings,
)
from .methods.base import Block, Progress
from .options import Options
from .output import OutputTransaction, check_extra_globs, copy_side_files
from .recipe import Recipe
from .shards import ShardWriter, parse_size, write_json
from .source import SourceModel, check_finite

# files of the base directory that are rewritten, hence not copied as they are (nor are weights)
NOT_COPIED_NAMES = {"config.json", INDEX_FILE, MANIFEST_FILE, CARD_FILE}  # the base's card describes the base


Model = Path | str | ResolvedModel  # a directory, a Hub repo id, or one already resolved (hub.resolve_model)


def prepare(model: Model, recipe: Recipe, options: Options) -> Job:
    """Read metadata, validate the checkpoint against its architecture, resolve the job."""
    job = resolve_job(SourceModel.open(resolve_model(model).path), recipe, options)
    check_extra_globs(job.source.files(), options.copy_extra, job.source.dir)
    if options.allow_nonfinite and job.method.needs_finite:
        raise UsageError(
            f"--allow-nonfinite cannot help method {recipe.method}: it aligns or learns from the source "
            "weights, which must be finite; fix the checkpoint (copy, average and stack pass NaN/Inf through)"
        )
    return job


def dry_run(model: Model, recipe: Recipe, out_dir: Path | str | None, options: Options = Options()) -> dict:
    """Everything upscale checks before writing, and the resolved plan; writes nothing."""
    job = prepare(model, recipe, options)
    if out_dir is not None:
        OutputTransaction(out_dir, options.overwrite, job.source.dir).check()
    parse_size(options.shard_size)
    return {"dry_run": True, "plan": job.describe(), "recipe": recipe.to_dict()}


def upscale(
    model: Model, recipe: Recipe, out_dir: Path | str, options: Options = Options(), progress: Progress | None = None
) -> Manifest:
    """Run the job; returns the manifest written beside the checkpoint."""
    started = time.perf_counter()
    model = resolve_model(model)
    job = prepare(model, recipe, options)
    source = job.source
    transaction = OutputTransaction(out_dir, options.overwrite, source.dir)
    transaction.check()
    shard_bytes = parse_size(options.shard_size)

    timings: dict[str, float] = {"plan": time.perf_counter() - started}
    t0 = time.perf_counter()
    method_warnings = job.method.prepare(job, progress)  # methods that learn from the whole stack work here
    timings["prepare"] = time.perf_counter() - t0
    hashing = Hashing()  # one thread per core: base and output checksums overlap the writing
    base_files = [(p.name, hashing.file(p)) for p in source.files()]
    layer_entries: list[LayerEntry] = []
    try:
        with transaction as tmp:
            t0 = time.perf_counter()
            writer = ShardWriter(tmp, job.entries(), shard_bytes, hashing)
            try:
                _write_tensors(job, writer, layer_entries, options, progress)
                writer.finish()
            finally:
                writer.abort()
            timings["tensors"] = time.perf_counter() - t0
            timings["tensors_write_copy"] = writer.io_seconds  # of which in pwrite / copy_file_range
            timings["tensors_checksum_wait"] = writer.hash_wait_seconds  # of which waiting for the output's sha256
            config, config_notes, config_warnings = rewrite_config(
                source.raw_config, source.hf_config, source.arch, job.layers, job.dtype
            )
            write_json(tmp / "config.json", config)
            copy_side_files(source.files(), tmp, NOT_COPIED_NAMES, options.copy_extra)
            model_card(
                base_repo_id=model.repo_id,
                base_dir=source.dir,
                model_type=source.arch.model_type,
                recipe=recipe.to_dict(),
                layers=layer_entries,
                new_layers=job.new_layers,
                function_preserving=job.function_preserving,
                out_dir=Path(out_dir),
                tool_version=__version__,
            ).save(tmp / CARD_FILE)
            t0 = time.perf_counter()
            base = [FileEntry(name, *future.result()) for name, future in base_files]
            timings["base_checksums_wait"] = time.perf_counter() - t0
            timings["checksums_cpu"] = hashing.cpu_seconds  # on the hashing threads, in and out (Hub blob names: free)
            output_files = [_file_entry(p, writer.digests.get(p.name)) for p in sorted(tmp.iterdir())]
            timings["total"] = time.perf_counter() - started
            parent = read_manifest(source.dir)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                tool={"name": "opt-deus", "version": __version__, "torch": torch.__version__},
                base=BaseInfo(
                    str(source.dir.resolve()),
                    source.arch.model_type,
                    job.base_layers,
                    base,
                    model.repo_id,
                    model.revision,
                ),
                recipe=recipe.to_dict(),
                resolved=job.describe(with_layers=False),
                function_preserving=job.function_preserving,
                layers=layer_entries,
                new_layers=job.new_layers,
                trainable_parameter_regex=job.trainable_regex(),
                config_notes=config_notes,
                warnings=config_warnings + method_warnings + layer_warnings(layer_entries),
                output=OutputInfo(str(Path(out_dir).absolute()), len(job.layers), output_files),
                timings={k: round(v, 4) for k, v in timings.items()},
                parent=parent.to_dict() if parent else None,
                trainable_layers=job.new_layers,
            )
            manifest.write(tmp / MANIFEST_FILE)
            transaction.commit()
    finally:
        hashing.shutdown(wait=False)
    return manifest


def build_new_layer(job: Job, layer: OutputLayer, allow_nonfinite: bool) -> tuple[Block, dict]:
    source = job.source
    if not allow_nonfinite:
        fix = (
            f"fix the checkpoint (method {job.recipe.method} needs finite weights)"
            if job.method.needs_finite
            else "fix the checkpoint or pass --allow-nonfinite"
        )
        for k in layer.sources:
            check_finite(source.block(k), source.arch.layer_prefix(k), "source", fix)
    block, report = job.method.build(*source.canonical_pair(layer.sources, job.device, job.dtype, job.decisions))
    block = source.arch.from_canonical(block, source.layout)
    for rel, value in job.start_values(layer).items():
        block[rel] = torch.full_like(block[rel], value)
    if not allow_nonfinite:
        check_finite(block, source.arch.layer_prefix(layer.index), "built")
    return block, report


def _write_tensors(
    job: Job, writer: ShardWriter, layer_entries: list[LayerEntry], options: Options, progress: Progress | None
) -> None:
    source = job.source
    ckpt, arch = source.ckpt, source.arch

    def copy_tensor(out_name: str, src_name: str) -> None:
        """A base tensor into the output unchanged: a byte copy, or a cast with --dtype."""
        meta = ckpt.meta(src_name)
        if job.out_dtype(meta) == meta.dtype:
            writer.copy_raw(out_name, meta, *ckpt.raw(src_name))
        else:
            writer.write(out_name, ckpt.read(src_name).to(job.out_dtype(meta)))

    total = len(job.layers)
    for name in source.pre:
        copy_tensor(name, name)
    for layer in job.layers:
        if progress:
            what = (
                f"base layer {layer.sources[0]}"
                if layer.origin == "base"
                else f"new: {layer.method} of {list(layer.built_from)}"
            )
            progress(f"layer {layer.index} ({what})", layer.index, total)
        t0 = time.perf_counter()
        k = layer.sources[0]
        prefix, src_prefix = arch.layer_prefix(layer.index), arch.layer_prefix(k)
        start = job.start_values(layer)
        entry = LayerEntry(
            layer.index,
            layer.origin,
            list(layer.built_from),
            layer.method,
            [prefix + rel for rel, value in start.items() if value == 0],
            start_values={prefix + rel: value for rel, value in start.items() if value != 0} or None,
            settings_from=layer.settings_from if layer.is_new else None,
        )
        if layer.is_new and not job.method.copies_lower:
            block, report = build_new_layer(job, layer, options.allow_nonfinite)
            for rel in source.blocks[k]:
                writer.write(prefix + rel, block[rel].to(job.out_dtype(ckpt.meta(src_prefix + rel))))
            del block  # written (hashed from the file): not held while the next layer is built
            entry.report = report or None
        else:  # a base layer, or a copy of one (LLaMA-Pro, SOLAR): bytes copied, constants written as bytes
            if layer.is_new and not options.allow_nonfinite:
                check_finite(source.block(k), src_prefix, "source")
            for rel in source.blocks[k]:
                if rel in start:
                    meta = ckpt.meta(src_prefix + rel)
                    writer.write_constant(prefix + rel, TensorMeta(job.out_dtype(meta), meta.shape), start[rel])
                else:
                    copy_tensor(prefix + rel, src_prefix + rel)
        if layer.is_new:
            entry.seconds = round(time.perf_counter() - t0, 4)
        layer_entries.append(entry)
    for name in source.post:
        copy_tensor(name, name)
    if progress:
        progress("done", total, total)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def layer_warnings(entries: list[LayerEntry]) -> list[str]:
    """What the new layers' reports warn about, one line for the layers that warn alike rather
    than a copy per layer: "layers 4, 6, 8, 10: mlp plan did not converge (iterations 10000,
    marginal error 2.6e-07..2.8e-07)": warnings that differ only in their figures are one line,
    with each figure's range. Each layer's own figures stay in its report in the manifest."""
    found: dict[tuple[str, ...], list[tuple[int, str]]] = {}  # warnings with figures masked -> (layer, text)
    for entry in entries:
        text = "; ".join(report_warnings(entry.report or {}))
        if text:
            found.setdefault(tuple(NUMBER.split(text)), []).append((entry.index, text))
    lines = []
    for skeleton, members in found.items():
        figures = [NUMBER.findall(text) for _, text in members]  # (layers, figures in the text)
        merged = []
        for column in zip(*figures):
            low, high = min(column, key=float), max(column, key=float)
            merged.append(low if float(low) == float(high) else f"{low}..{high}")
        text = "".join(part + (merged[i] if i < len(merged) else "") for i, part in enumerate(skeleton))
        indices = ", ".join(str(index) for index, _ in members)
        lines.append(f"layer{'s' if len(members) > 1 else ''} {indices}: {text}")
    return lines


def _file_entry(path: Path, digest: tuple[int, str] | None = None) -> FileEntry:
    size, sha = digest if digest else (path.stat().st_size, sha256_file(path))
    return FileEntry(path.name, size, sha)
