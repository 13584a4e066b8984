"""The record written beside the checkpoint: where every output layer came from."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import OptDeusError

MANIFEST_FILE = "opt-deus-manifest.json"
FORMAT_VERSION = 1


def read_manifest(model_dir: Path | str, required: bool = False) -> dict | None:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise OptDeusError(f"{model_dir} has no {MANIFEST_FILE}; is it an opt-deus output?")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptDeusError(f"{path} is not valid JSON ({e})")
