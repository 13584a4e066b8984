"""MODEL as the Hub names it: `org/name` resolved to a local snapshot through huggingface_hub
(its cache, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE are huggingface_hub's own).
An existing local path always wins; only the files opt-deus reads are fetched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import OptDeusError, UsageError

# What the deeper model needs: weights, configs, tokenizer, chat template, licence and the card
# (for its licence); never pickles, never code.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "LICENSE*",
    "LICENCE*",
    "license*",
    "NOTICE*",
    "USE_POLICY*",
    "README.md",
]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a MODEL argument lives on disk, and the Hub repo and commit it came from (if any)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit hash the snapshot belongs to


def resolve_model(spec: str | Path | ResolvedModel, revision: str | None = None) -> ResolvedModel:
    if isinstance(spec, ResolvedModel):
        return spec
    path = Path(spec)
    if path.exists() or not REPO_ID.fullmatch(str(spec)):
        if revision is not None:
            raise UsageError(f"--revision applies to a Hub repo id; {spec} is a local path")
        return ResolvedModel(path)
    snapshot = _snapshot(str(spec), revision)
    return ResolvedModel(snapshot, str(spec), _commit_of(snapshot))


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except hub_errors.GatedRepoError:
        raise OptDeusError(
            f"Hub repo {repo_id} is gated: accept its licence on the Hub, then set HF_TOKEN (or `hf auth login`)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise OptDeusError(
            f"no local directory {repo_id}, and no Hub repo {repo_id} (or it is private: set HF_TOKEN)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise OptDeusError(f"Hub repo {repo_id} has no revision {revision}") from None
    except hub_errors.LocalEntryNotFoundError:  # offline by choice, or the Hub could not be reached
        from huggingface_hub import constants

        why = "offline: HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network"
        raise OptDeusError(
            f"no local directory {repo_id}, and Hub repo {repo_id}{at} is not in the local cache "
            f"({why}); download it once online, or give a local directory"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise OptDeusError(f"cannot fetch Hub repo {repo_id}{at}: {reason}") from e


def _commit_of(snapshot: Path) -> str | None:
    """The cache names a snapshot directory after its commit hash."""
    name = snapshot.name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
