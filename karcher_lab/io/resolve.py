"""Where a model lives: a local directory, or a hub id resolved from the local Hugging Face cache only.

karcher_lab never downloads: a hub id (``org/name`` or ``org/name@revision``) is looked up with
``local_files_only=True``, so a model that is not cached gets a clear CheckpointError telling the user
to download it (``hf download org/name``) or to pass a local directory. (mergekit downloads missing
models; this machine, like many clusters, has no network.)
"""
from __future__ import annotations

from pathlib import Path

from karcher_lab.errors import CheckpointError


def _cache_hint() -> str:
    from huggingface_hub import constants

    offline = " (offline mode: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    return f"the Hugging Face cache at {constants.HF_HUB_CACHE}{offline}"


def resolve_model_dir(path: str, revision: str | None = None, relative_to: Path | None = None) -> Path:
    """The local directory holding ``path``: itself when it is a directory (relative paths are tried in
    the working directory first, then in ``relative_to``), else the cached snapshot of hub id ``path``."""
    candidates = [Path(path).expanduser()]
    if relative_to is not None and not Path(path).is_absolute():
        candidates.append(relative_to / path)
    for candidate in candidates:
        if candidate.is_dir():
            if revision:
                raise CheckpointError(f"model {path}@{revision}: a revision only applies to hub ids, but {path!r} is a local directory")
            return candidate.resolve()
        if candidate.exists():
            raise CheckpointError(f"model {path!r} is a file; a model is a directory with config.json and weights")
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"model {path!r}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError):
        shown = f"{path}@{revision}" if revision else path
        raise CheckpointError(
            f"model {shown!r} is not a local directory and is not in {_cache_hint()}; karcher-lab never "
            f"downloads: fetch it first (e.g. `hf download {path}`) or give the path of a local checkpoint"
        ) from None
