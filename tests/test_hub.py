"""hub.py on its own (issue 19): what reads as a Hub repo id, a local path winning over it, the
revision refused for a path, the commit named by the snapshot directory, and huggingface_hub's
offline refusal turned into one line (no network: HF_HUB_OFFLINE and an empty cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_deus_cli.errors import UsageError
from opt_deus_cli.hub import REPO_ID, ResolvedModel, resolve_model


@pytest.mark.parametrize(
    "text, is_repo",
    [
        ("Qwen/Qwen2.5-7B", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("org/name.v2_x", True),
        ("model", False),
        ("./org/name", False),
        ("org/name/extra", False),
        ("/abs/path", False),
        ("-org/name", False),
    ],
)
def test_what_reads_as_a_repo_id(text, is_repo):
    assert bool(REPO_ID.fullmatch(text)) is is_repo


def test_a_local_path_wins_and_takes_no_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    resolved = resolve_model("org/name")  # reads as a repo id, but the directory exists
    assert resolved == ResolvedModel(Path("org/name")) and resolved.repo_id is None
    assert resolve_model(resolved) is resolved
    with pytest.raises(UsageError, match="--revision applies to a Hub repo id; org/name is a local path"):
        resolve_model("org/name", revision="main")


def test_offline_without_the_repo_in_the_cache_is_one_line(tmp_path):
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when imported: a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "cache"))
    code = (
        "from opt_deus_cli.hub import resolve_model\nfrom opt_deus_cli.errors import OptDeusError\n"
        "try:\n    resolve_model('someorg/absent-model')\nexcept OptDeusError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "no local directory someorg/absent-model, and Hub repo someorg/absent-model is "
        "not in the local cache (offline: HF_HUB_OFFLINE is set); download it once online, "
        "or give a local directory"
    )
