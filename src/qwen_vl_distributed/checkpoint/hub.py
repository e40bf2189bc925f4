"""What ``--model`` names: a checkpoint directory, a Hugging Face cache's repo folder, or a hub repo id.

- A directory is used as it is. A cache repo folder (``models--ORG--NAME``, with ``refs/`` and ``snapshots/``)
  resolves to the snapshot its ``refs/main`` (or ``--revision``) names; a snapshot folder inside one is that commit.
- ``ORG/NAME`` (not an existing directory) is resolved by huggingface_hub in its cache (``HF_HUB_CACHE``, else
  ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``), at ``--revision`` (a branch, tag or commit; default main).
  Nothing goes over the network unless the user passes ``--download``; then huggingface_hub fetches the files the
  model needs, with progress bars, resuming partial files. ``HF_HUB_OFFLINE=1`` forbids that, and says so.

The resolved commit goes into the fingerprint the ranks compare, so every rank of a multi-machine run serves the
same revision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CheckpointError

CACHE_PREFIX = "models--"
DEFAULT_REVISION = "main"
# what a run reads: config and processor JSON, the weights, the chat template, a BPE tokenizer's merges
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt")


class ModelSourceError(CheckpointError):
    """A --model / --revision that names no checkpoint this machine has (or may fetch)."""


@dataclass(frozen=True)
class ModelSource:
    path: str                  # a local directory: config.json, weights, processor files
    repo_id: str | None = None  # ORG/NAME when it came from a hub cache
    revision: str | None = None  # the commit of that snapshot

    @property
    def name(self) -> str:
        """What to call the model: its repo id, else its directory's name."""
        return self.repo_id or os.path.basename(os.path.normpath(self.path))


def _repo_id_of_cache_folder(folder: str) -> str:
    return os.path.basename(os.path.normpath(folder))[len(CACHE_PREFIX):].replace("--", "/")


def _is_cache_folder(path: str) -> bool:
    return (os.path.basename(os.path.normpath(path)).startswith(CACHE_PREFIX)
            and os.path.isdir(os.path.join(path, "snapshots")))


def _from_cache_folder(folder: str, revision: str | None) -> ModelSource:
    """``models--ORG--NAME`` -> its snapshot at ``revision`` (a ref under refs/, or a commit under snapshots/)."""
    rev = revision or DEFAULT_REVISION
    snapshots = os.path.join(folder, "snapshots")
    ref = os.path.join(folder, "refs", rev)
    commit = rev
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    if not os.path.isdir(os.path.join(snapshots, commit)):
        have = sorted(os.listdir(snapshots))
        what = f"refs/{rev} names snapshot {commit}, which is not there" if os.path.isfile(ref) else \
            f"no refs/{rev} and no snapshot {rev}"
        raise ModelSourceError(f"{folder}: a Hugging Face cache folder with {what}; its snapshots: "
                               f"{', '.join(have) or 'none'} (pass --revision COMMIT, or --model "
                               f"{os.path.join(snapshots, 'COMMIT')})")
    return ModelSource(os.path.join(snapshots, commit), _repo_id_of_cache_folder(folder), commit)


def _from_directory(path: str, revision: str | None) -> ModelSource:
    if _is_cache_folder(path):
        return _from_cache_folder(path, revision)
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.basename(parent) == "snapshots" and _is_cache_folder(os.path.dirname(parent)):
        commit = os.path.basename(os.path.normpath(path))
        if revision is not None and revision != commit:
            raise ModelSourceError(f"--revision {revision}: --model {path} is the snapshot of commit {commit}")
        return ModelSource(path, _repo_id_of_cache_folder(os.path.dirname(parent)), commit)
    if revision is not None:
        raise ModelSourceError(f"--revision {revision}: only a hub repo id (ORG/NAME) or a Hugging Face cache folder "
                               f"has revisions, not the directory {path}")
    return ModelSource(path)


def _from_hub(repo_id: str, revision: str | None, download: bool) -> ModelSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if download and constants.HF_HUB_OFFLINE:
        raise ModelSourceError(f"--download {repo_id}: HF_HUB_OFFLINE is set, which forbids network access "
                               "(unset it to download, or drop --download to use the local cache)")
    at = f" at revision {revision}" if revision else ""
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=not download,
                                 allow_patterns=list(DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError:
        how = ("" if download else "; pass --download to fetch it from the Hugging Face hub (or set HF_HUB_CACHE / "
               "HF_HOME to the cache holding it)")
        raise ModelSourceError(f"--model {repo_id}: not found{at} in the Hugging Face cache "
                               f"{constants.HF_HUB_CACHE}{how}") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelSourceError(f"--model {repo_id}{at}: {type(e).__name__}: {first}") from None
    return ModelSource(path, repo_id, os.path.basename(os.path.normpath(path)))


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model(model: str, revision: str | None = None, download: bool = False) -> ModelSource:
    """The local directory ``model`` names (see the module docstring). An existing directory wins over a repo id of
    the same spelling, as in transformers."""
    if os.path.isdir(model):
        return _from_directory(model, revision)
    if _is_repo_id(model):
        return _from_hub(model, revision, download)
    raise ModelSourceError(f"--model {model}: no such directory, and not a hub repo id (ORG/NAME)")
