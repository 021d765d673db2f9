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


def _candidates(path: str, relative_to: Path | None) -> list[Path]:
    candidates = [Path(path).expanduser()]
    if relative_to is not None and not Path(path).is_absolute():
        candidates.append(relative_to / path)
    return candidates


def local_directory(path: str, relative_to: Path | None = None) -> Path | None:
    """The local directory ``path`` names (tried as in :func:`resolve_model_dir`), None if none."""
    return next((c.resolve() for c in _candidates(path, relative_to) if c.is_dir()), None)


def resolve_model_dir(path: str, revision: str | None = None, relative_to: Path | None = None) -> Path:
    """The local directory holding ``path``: itself when it is a directory (relative paths are tried in
    the working directory first, then in ``relative_to``), else the cached snapshot of hub id ``path``."""
    for candidate in _candidates(path, relative_to):
        if candidate.is_dir():
            if revision:
                raise CheckpointError(f"model {path}@{revision}: a revision only applies to hub ids, but {path!r} is a local directory")
            return candidate.resolve()
        if candidate.exists():
            raise CheckpointError(f"model {path!r} is a file; a model is a directory with config.json and weights")
    if revision and local_directory(f"{path}@{revision}", relative_to) is not None:
        raise CheckpointError(
            f"model {path}@{revision}: '@' separates a hub revision (as in mergekit), so this was read as "
            f"path {path!r} at revision {revision!r}, but {path}@{revision} is a local directory; give it as "
            f"'model: {{path: {path}@{revision}}}' or rename the directory"
        )
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        split = f" (read as path {path!r} at revision {revision!r}: '@' separates a revision)" if revision else ""
        raise CheckpointError(f"model {path!r}: no such directory{split}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError):
        shown = f"{path}@{revision}" if revision else path
        split = f" (read as hub id {path!r} at revision {revision!r}: '@' separates a revision)" if revision else ""
        raise CheckpointError(
            f"model {shown!r} is not a local directory and is not in {_cache_hint()}{split}; karcher-lab never "
            f"downloads: fetch it first (e.g. `hf download {path}`) or give the path of a local checkpoint"
        ) from None
