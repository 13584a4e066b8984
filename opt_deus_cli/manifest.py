"""The record written beside the checkpoint: where every output layer came from. The Manifest
dataclass is the one place that knows the file's keys; upscale builds it, and cli, inspect,
verify and train read it through this module."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OptDeusError

MANIFEST_FILE = "opt-deus-manifest.json"
FORMAT_VERSION = 1


@dataclass
class FileEntry:
    name: str
    bytes: int
    sha256: str


@dataclass
class LayerEntry:
    index: int  # output layer index
    origin: str  # "base" or "new"
    sources: list[int]  # base layers it is built from
    method: str  # "base" for kept layers
    zeroed: list[str]  # full names of zero-initialised tensors
    # the method's figures (JSON), by group; each group may say "converged": false or list
    # "warnings" (see report_warnings)
    report: dict | None = None
    seconds: float | None = None
    # tensors set to another constant at the start, full name -> value (a post-norm's weight at
    # -1: Gemma's scale 1 + w is then 0, so the branch starts at zero with o/down kept as built)
    start_values: dict[str, float] | None = None
    # a new layer: the base layer whose per-layer config (layer type, window, RoPE) it takes
    settings_from: int | None = None

    @property
    def is_new(self) -> bool:
        return self.origin == "new"


@dataclass
class BaseInfo:
    path: str  # the directory read (for a Hub repo id: its snapshot in the cache)
    model_type: str
    num_layers: int
    files: list[FileEntry]
    repo_id: str | None = None  # when MODEL was a Hub repo id
    revision: str | None = None  # the resolved commit hash


@dataclass
class OutputInfo:
    path: str
    num_layers: int
    files: list[FileEntry]


@dataclass
class Manifest:
    format_version: int
    tool: dict  # name, version, torch
    base: BaseInfo
    recipe: dict  # Recipe.to_dict()
    resolved: dict  # Job.describe(with_layers=False)
    function_preserving: bool
    layers: list[LayerEntry]
    new_layers: list[int]
    trainable_parameter_regex: str
    config_notes: list[str]
    warnings: list[str]
    output: OutputInfo
    timings: dict[str, float]
    parent: dict | None = None  # the base's own manifest, when the base is an opt-deus output
    # output layers to train (the new ones): what freeze_base and the handoffs select
    trainable_layers: list[int] = dataclasses.field(default_factory=list)
    training: dict | None = None  # written by `opt-deus train`: data, steps, losses, world size

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [{k: v for k, v in layer.items() if v is not None} for layer in d["layers"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        try:
            base, output = dict(d["base"]), dict(d["output"])
            base["files"] = [FileEntry(**f) for f in base["files"]]
            output["files"] = [FileEntry(**f) for f in output["files"]]
            values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
            values.setdefault("trainable_layers", list(d["new_layers"]))  # manifests before it was recorded
            values.update(
                base=_known(BaseInfo, base),
                output=_known(OutputInfo, output),
                layers=[_known(LayerEntry, layer) for layer in d["layers"]],
            )
            return cls(**values)
        except (KeyError, TypeError) as e:
            raise OptDeusError(
                f"the manifest does not have the expected layout ({type(e).__name__}: {e}); "
                "was it written by another opt-deus version?"
            ) from e

    def write(self, path: Path) -> None:
        from .shards import write_json

        write_json(path, self.to_dict())

    # ---- what readers ask ------------------------------------------------------------------
    def layer(self, index: int) -> LayerEntry:
        return self.layers[index]

    @property
    def method(self) -> str:
        return self.recipe["method"]


def _known(cls, d: dict[str, Any]):
    """A dataclass from a dict, ignoring keys a later format version may have added."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def read_manifest(model_dir: Path | str, required: bool = False) -> Manifest | None:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise OptDeusError(f"{model_dir} has no {MANIFEST_FILE}; is it an opt-deus output?")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptDeusError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise OptDeusError(f"{path} is not an opt-deus manifest (not a JSON object)")
    return Manifest.from_dict(data)


def report_warnings(report: dict) -> list[str]:
    """What a method's report says went wrong: a plan that did not converge or lost mass."""
    found = []
    for group, figures in report.items():
        if isinstance(figures, dict):
            if figures.get("converged") is False:  # one line; the solver's own words are in the report
                found.append(
                    f"{group} plan did not converge (iterations {figures.get('iterations')}, "
                    f"marginal error {figures.get('marginal_error', float('nan')):.2g})"
                )
            else:
                found += [f"{group}: {w}" for w in figures.get("warnings", [])]
    return found
