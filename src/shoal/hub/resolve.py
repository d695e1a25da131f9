"""From a hub reference to what a launch needs: the commit, the files, whether they are all in the
cache (then the local path), else the estimate's inputs read from the hub. Offline
(HF_HUB_OFFLINE=1), or when the hub cannot be reached, the cache alone answers: no network call.
Blocking I/O: call it in a thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.catalog.estimate import RemoteWeights, read_gguf_shape, read_hf_shape
from shoal.errors import HubNotFound, HubUnreachable, InvalidRequest
from shoal.hub import cache, media
from shoal.hub.names import HubRef
from shoal.hub.remote import (
    SMALL_FILE,
    RemoteFile,
    RemoteRepo,
    Selection,
    read_range,
    remote_weights,
    repo_info,
    select,
)

log = logging.getLogger("shoal.hub")


@dataclass(frozen=True)
class HubModel:
    ref: HubRef
    commit: str
    selection: Selection
    local: Path | None  # the target in the cache, when every file is there
    weights: RemoteWeights | None  # read from the hub, when not
    context_length: int | None

    @property
    def missing(self) -> list[RemoteFile]:
        return [] if self.local is not None else list(self.selection.files)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_repo(root: Path, ref: HubRef) -> RemoteRepo | None:
    """The repo as the cache has it (its files at the commit the revision last resolved to)."""
    commit = cache.cached_commit(root, ref.repo, ref.revision)
    folder = cache.snapshot(root, ref.repo, commit) if commit else None
    if commit is None or folder is None or not folder.is_dir():
        return None
    files = tuple(
        RemoteFile(str(p.relative_to(folder)), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    )
    return RemoteRepo(ref.repo, commit, files, ref.hub, ref.revision)


def _local_context(path: Path, model_format: str) -> int | None:
    if model_format in media.MEDIA_FORMATS:
        return None
    try:
        shape = read_gguf_shape(path) if model_format == "ggufv2" else read_hf_shape(path)
    except (OSError, ValueError):
        return None
    return shape.context_length


def _model_index(
    ref: HubRef, remote: RemoteRepo, root: Path, model_format: str | None
) -> dict[str, Any] | None:
    """A diffusers pipeline's model_index.json (which components it loads): from the cache when it
    is there, else read whole from the hub."""
    f = remote.get(media.MODEL_INDEX)
    if f is None or model_format not in (None, "diffusers"):
        return None
    local = cache.snapshot(root, ref.repo, remote.commit) / media.MODEL_INDEX
    if not local.is_file() and not 0 < f.size <= SMALL_FILE:
        raise InvalidRequest(f"{ref.name}: its {media.MODEL_INDEX} is {f.size} bytes, not a pipeline's index")
    try:
        raw = local.read_bytes() if local.is_file() else read_range(remote, f.path, 0, f.size - 1)
        index = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{ref.name}: its {media.MODEL_INDEX} is not readable JSON ({exc})") from None
    if not isinstance(index, dict):
        raise InvalidRequest(f"{ref.name}: its {media.MODEL_INDEX} is not a JSON object")
    return index


def resolve(
    ref: HubRef,
    model_type: str | None,
    root: Path,
    model_format: str | None = None,
    variant: str | None = None,
) -> HubModel:
    remote: RemoteRepo | None = None
    if not offline():
        try:
            remote = repo_info(ref)
        except HubUnreachable as exc:
            if _cached_repo(root, ref) is None:
                raise
            log.warning("%s; launching %s from the cache", exc.message, ref.name)
    from_cache = remote is None
    if remote is None:  # offline: the cache alone
        remote = _cached_repo(root, ref)
        if remote is None:
            raise HubNotFound(
                f"{ref.name} is not in the cache ({root}) and the hub is offline (HF_HUB_OFFLINE=1 "
                "or unreachable); pull it on a networked machine first"
            )
    index = _model_index(ref, remote, root, model_format)
    selection = select(ref, remote, model_type, model_format, index, variant)
    if from_cache and not cache.has_files(root, ref.repo, remote.commit, [f.path for f in selection.files]):
        raise HubNotFound(f"{ref.name}: the cache holds only part of it and the hub is offline")
    paths = [f.path for f in selection.files]
    if cache.has_files(root, ref.repo, remote.commit, paths):
        local = cache.snapshot(root, ref.repo, remote.commit) / selection.target
        return HubModel(
            ref, remote.commit, selection, local, None, _local_context(local, selection.model_format)
        )
    weights, context = remote_weights(remote, selection)
    return HubModel(ref, remote.commit, selection, None, weights, context)
