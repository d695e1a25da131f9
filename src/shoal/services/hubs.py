"""The model service's hub side: hub names and catalog hub sources resolved to a cached path or a
download, the downloads themselves (shared, resumable, with progress), and the cache listing and
removal (refused while a model uses it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from shoal.catalog import ModelFamily, Source
from shoal.errors import Conflict, InvalidRequest, ModelNotFound, ShoalError
from shoal.hub import cache
from shoal.hub.download import Downloader, Pull
from shoal.hub.names import HubRef
from shoal.hub.resolve import HubModel, resolve
from shoal.services.replicas import RunningModel
from shoal.settings import ServerSettings

BUILT_HUBS = ("huggingface", "hf")
KNOWN_HUBS = ("huggingface", "hf", "modelscope", "openmind_hub", "csghub")
HUB_TYPES = ("LLM", "embedding", "rerank")


def check_hub(download_hub: str | None) -> None:
    """Xinference's download_hub (or SHOAL_DOWNLOAD_HUB): only Hugging Face is built."""
    if download_hub is None or download_hub.lower() in BUILT_HUBS:
        return
    if download_hub.lower() in KNOWN_HUBS:
        raise InvalidRequest(
            f"download_hub {download_hub!r} is not built in Shoal yet: only huggingface (HF_ENDPOINT "
            "may point at a mirror)"
        )
    raise InvalidRequest(f"download_hub must be huggingface, not {download_hub!r}")


def catalog_ref(source: Source) -> HubRef | None:
    if not source.hf_repo:
        return None
    return HubRef("huggingface", source.hf_repo, source.hf_file)


class HubService:
    def __init__(self, settings: ServerSettings) -> None:
        self.root = settings.model_cache.expanduser() / "hub"
        self.downloads = Downloader(self.root, settings.disk_headroom)
        self.default_hub = settings.download_hub

    async def resolve(self, ref: HubRef, model_type: str | None) -> HubModel:
        if model_type is not None and model_type not in HUB_TYPES:
            raise InvalidRequest(
                f"hub names launch {', '.join(HUB_TYPES)} models; {model_type!r} needs a catalog entry"
            )
        return await asyncio.to_thread(resolve, ref, model_type, self.root)

    @staticmethod
    def family(hub: HubModel) -> ModelFamily:
        """A catalog family for a hub name (its model_name is the hub name)."""
        sel = hub.selection
        family = ModelFamily.model_validate(
            {
                "model_name": hub.ref.default_uid(),
                "model_type": sel.model_type,
                "context_length": hub.context_length,
                "model_description": f"{hub.ref.name} at {hub.commit}",
                "model_specs": [
                    {
                        "model_format": sel.model_format,
                        "quantization": sel.quantization,
                        "source": {"hf_repo": hub.ref.repo, "hf_file": sel.target or None},
                    }
                ],
            }
        )
        return family.model_copy(update={"model_name": hub.ref.name})

    def source(self, hub: HubModel) -> Source:
        if hub.local is not None:
            cache.touch(self.root, hub.ref.repo)
            return Source(path=str(hub.local))
        return Source(hf_repo=hub.ref.repo, hf_file=hub.selection.target or None)

    def start(self, hub: HubModel) -> Pull:
        """Check the disk (507 up front), then start or join the downloads."""
        folder = cache.snapshot(self.root, hub.ref.repo, hub.commit)
        files = [f for f in hub.missing if not (folder / f.path).is_file()]
        self.downloads.check_disk(hub.ref.repo, files)
        cache.touch(self.root, hub.ref.repo)
        return self.downloads.pull(hub.ref.name, hub.ref.repo, hub.commit, hub.ref.revision, files)

    async def fetch(self, hub: HubModel, pull: Pull) -> Source:
        path = await pull.wait(self.root, hub.selection.target)
        return Source(path=str(path))

    # ---- the cache ---------------------------------------------------------------------------
    def _users(self, repo: str, models: Iterable[RunningModel]) -> list[str]:
        folder = str(cache.repo_dir(self.root, repo))
        return [
            m.uid
            for m in models
            if (m.source.path and Path(m.source.path).as_posix().startswith(folder + "/"))
            or m.source.hf_repo == repo
        ]

    def cached(self, models: Iterable[RunningModel]) -> list[dict[str, Any]]:
        running = list(models)
        return [e.describe(self._users(e.repo, running)) for e in cache.entries(self.root)]

    def remove(self, name: str, models: Iterable[RunningModel]) -> dict[str, Any]:
        repo = cache.repo_of(name)
        users = self._users(repo, models)
        if users:
            raise Conflict(f"hf.co/{repo} is in use by {', '.join(users)}; stop them first (shoal stop UID)")
        if self.downloads.active(repo):
            raise Conflict(f"hf.co/{repo} is being downloaded; wait for it or stop the launch")
        if not cache.remove(self.root, repo):
            raise ModelNotFound(f"hf.co/{repo} is not in the cache ({self.root})")
        return {"name": f"hf.co/{repo}", "status": "removed"}


PROGRESS_EVERY = 0.5  # seconds between progress lines of a pull


async def pull_progress(
    hubs: HubService, name: str, hub: HubModel | None, pull: Pull | None
) -> AsyncIterator[dict[str, Any]]:
    """A pull as it goes: progress objects every half second, then one with status "success" or
    "failed" (and the error). A client that leaves stops the lines, not the download."""
    if hub is None or pull is None:
        why = "already in the cache" if hub is not None else "its weights are local (a package or a path)"
        yield {"status": "success", "name": name, "detail": why}
        return
    fetch = asyncio.ensure_future(hubs.fetch(hub, pull))
    fetch.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
    while True:
        await asyncio.wait({fetch}, timeout=PROGRESS_EVERY)
        if fetch.done():
            break
        yield pull.progress()
    error = fetch.exception()
    if error is None:
        yield {**pull.progress(), "status": "success"}
    else:
        message = error.message if isinstance(error, ShoalError) else str(error)
        yield {**pull.progress(), "status": "failed", "error": message}
