"""MODEL as a Hub repo id (`opt-deus upscale org/name --revision REV`), resolved through
huggingface_hub from a cache laid out on disk (blobs by hash, snapshots, refs/main), offline.
Run as a subprocess: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_model, logits, make_hub_cache

REPO = "acme/tiny-llama"
COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"
OPT_DEUS = str(Path(sys.executable).with_name("opt-deus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model_factory):
    """A Hub cache holding REPO at COMMIT (refs/main), with a README card carrying a licence."""
    base = model_factory("llama", layers=4)
    staged = tmp_path_factory.mktemp("repo")
    for f in base.iterdir():
        (staged / f.name).write_bytes(f.read_bytes())
    (staged / "README.md").write_text("---\nlicense: apache-2.0\ntags: [base-tag]\n---\n# the base model's own card\n")
    root = tmp_path_factory.mktemp("hub")
    snapshot = make_hub_cache(root, REPO, staged, revision=COMMIT)
    return root, snapshot, base


def cli(cache_root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache_root),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache_root.parent / "hf-home"),
    }
    return subprocess.run([OPT_DEUS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_repo_id_is_resolved_offline_and_recorded(cache, tmp_path):
    root, snapshot, base = cache
    result = cli(root, tmp_path, "upscale", REPO, "--recipe", "llama-pro", "--out", "deeper", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "deeper" / "opt-deus-manifest.json").read_text())
    assert manifest["base"]["repo_id"] == REPO and manifest["base"]["revision"] == COMMIT
    assert Path(manifest["base"]["path"]) == snapshot.resolve()
    assert manifest["function_preserving"]
    assert (logits(load_model(tmp_path / "deeper")) - logits(load_model(base))).abs().max() == 0


def test_revision_by_commit_and_unknown_revision(cache, tmp_path):
    root, _, _ = cache
    ok = cli(root, tmp_path, "upscale", REPO, "--revision", COMMIT, "--recipe", "llama-pro", "--out", "a", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    bad = cli(root, tmp_path, "upscale", REPO, "--revision", "v9", "--recipe", "llama-pro", "--out", "b")
    assert bad.returncode == 1 and not (tmp_path / "b").exists()
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local cache" in lines[0] and "v9" in lines[0], bad.stderr


def test_unknown_repo_offline_is_one_clear_line(cache, tmp_path):
    root, _, _ = cache
    result = cli(root, tmp_path, "upscale", "acme/nothing-here", "--recipe", "llama-pro", "--out", "o")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "acme/nothing-here" in lines[0] and "offline" in lines[0]
    assert not (tmp_path / "o").exists()


def test_local_directory_wins_over_repo_id(cache, tmp_path):
    root, _, base = cache
    local = tmp_path / "acme" / "tiny-llama"
    local.parent.mkdir()
    os.symlink(base, local)  # a directory spelled like the repo id
    result = cli(root, tmp_path, "upscale", REPO, "--recipe", "llama-pro", "--out", "o", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "opt-deus-manifest.json").read_text())
    assert manifest["base"]["repo_id"] is None and manifest["base"]["path"] == str(base.resolve())
    refused = cli(root, tmp_path, "upscale", REPO, "--revision", COMMIT, "--recipe", "llama-pro", "--out", "p")
    assert refused.returncode == 2 and "--revision applies to a Hub repo id" in refused.stderr


def test_model_card_is_the_outputs_own(cache, tmp_path):
    """README.md of the output: huggingface_hub's card format, base_model = the repo id, the base
    card's licence, our tags, a body saying what was done; never the base's card."""
    from huggingface_hub import ModelCard

    root, _, _ = cache
    assert (
        cli(root, tmp_path, "upscale", REPO, "--recipe", "llama-pro", "--out", "deeper", "--device", "cpu").returncode
        == 0
    )
    card = ModelCard.load(tmp_path / "deeper" / "README.md")
    assert card.data.base_model == REPO and card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert {"opt-deus", "depth-upscaling", "copy"} <= set(card.data.tags) and "base-tag" not in card.data.tags
    manifest = json.loads((tmp_path / "deeper" / "opt-deus-manifest.json").read_text())
    assert f"New layers: {manifest['new_layers']}" in card.text and "opt-deus verify" in card.text
    assert "the base model's own card" not in card.text
    assert "README.md" in {f["name"] for f in manifest["output"]["files"]}  # checksummed like every file


def test_verify_and_inspect_take_the_repo_id(cache, tmp_path):
    """The card's `opt-deus verify <repo id> OUT` runs as written: the base resolves to the commit
    the manifest records; inspect surveys a base given by repo id."""
    root, _, _ = cache
    assert (
        cli(root, tmp_path, "upscale", REPO, "--recipe", "llama-pro", "--out", "deeper", "--device", "cpu").returncode
        == 0
    )
    checked = cli(root, tmp_path, "verify", REPO, "deeper", "--device", "cpu", "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"]
    surveyed = cli(root, tmp_path, "inspect", REPO, "--json", "--device", "cpu")
    assert surveyed.returncode == 0, surveyed.stderr
    assert json.loads(surveyed.stdout)["layers"] == 4
