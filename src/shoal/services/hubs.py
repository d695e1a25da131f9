"""The model service's hub side: hub names and catalog hub sources resolved to a cached path or a
download, the downloads themselves (shared, resumable, with progress), and the cache listing and
removal (refused while a model uses it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from shoal.catalog import ModelFamily, Source
from shoal.errors import Conflict, InvalidRequest, ShoalError
from shoal.hub import cache, modelscope
from shoal.hub.download import Downloader, HubFiles, Pull
from shoal.hub.names import HUB_PREFIX, HubRef
from shoal.hub.resolve import HubModel, offline, resolve
from shoal.services.replicas import RunningModel
from shoal.settings import ServerSettings

HUBS = ("huggingface", "modelscope")
HUB_ALIASES = {
    "huggingface": "huggingface",
    "hf": "huggingface",
    "modelscope": "modelscope",
    "ms": "modelscope",
}
KNOWN_HUBS = ("openmind_hub", "csghub")
# The abilities of an audio or image hub name (its files say which it is: hub/media.py).
MEDIA_ABILITIES = {"audio": ["audio2text"], "image": ["text2image"]}


def check_hub(download_hub: str | None) -> str:
    """Xinference's download_hub (or SHOAL_DOWNLOAD_HUB) as a hub name: huggingface or modelscope."""
    if download_hub is None:
        return "huggingface"
    hub = HUB_ALIASES.get(download_hub.lower())
    if hub is not None:
        return hub
    if download_hub.lower() in KNOWN_HUBS:
        raise InvalidRequest(
            f"download_hub {download_hub!r} is not built in Shoal: huggingface (HF_ENDPOINT may point "
            "at a mirror) or modelscope"
        )
    raise InvalidRequest(f"download_hub must be huggingface or modelscope, not {download_hub!r}")


def catalog_ref(source: Source, hub: str) -> HubRef | None:
    """The hub reference of a catalog source: on `hub` when the spec names a repo there, else on
    the hub it names (download_hub is a preference, so a spec on one hub still launches)."""
    on_modelscope = (
        HubRef("modelscope", source.ms_repo, source.ms_file, None, "master") if source.ms_repo else None
    )
    on_hf = HubRef("huggingface", source.hf_repo, source.hf_file) if source.hf_repo else None
    return (on_modelscope or on_hf) if hub == "modelscope" else (on_hf or on_modelscope)


def _source(ref: HubRef, file: str | None) -> Source:
    if ref.hub == "modelscope":
        return Source(ms_repo=ref.repo, ms_file=file)
    return Source(hf_repo=ref.repo, hf_file=file)


class HubService:
    def __init__(self, settings: ServerSettings) -> None:
        self.roots = cache.roots(settings.model_cache.expanduser())
        self.downloads = {
            hub: Downloader(root, settings.disk_headroom, hub, xet=settings.hub_xet)
            for hub, root in self.roots.items()
        }
        self.xet = settings.hub_xet
        self.default_hub = settings.download_hub
        self.disk_headroom = settings.disk_headroom
        self.probe_timeout = settings.hub_probe_timeout

    @property
    def root(self) -> Path:  # Hugging Face's, where most callers look
        return self.roots["huggingface"]

    async def resolve(
        self, ref: HubRef, model_type: str | None, model_format: str | None = None, variant: str | None = None
    ) -> HubModel:
        """What the hub (or the cache) says of a hub name (`model_format` None: its files say it),
        or of a catalog spec's repo (its format); `variant`: a diffusers launch's (fp16)."""
        return await asyncio.to_thread(resolve, ref, model_type, self.roots[ref.hub], model_format, variant)

    @staticmethod
    def family(hub: HubModel) -> ModelFamily:
        """A catalog family for a hub name (its model_name is the hub name)."""
        sel = hub.selection
        family = ModelFamily.model_validate(
            {
                "model_name": hub.ref.default_uid(),
                "model_type": sel.model_type,
                "model_ability": MEDIA_ABILITIES.get(sel.model_type, []),
                "context_length": hub.context_length,
                "model_description": f"{hub.ref.name} at {hub.commit}",
                "model_specs": [
                    {
                        "model_format": sel.model_format,
                        "quantization": sel.quantization,
                        "source": _source(hub.ref, sel.target or None).model_dump(exclude_none=True),
                    }
                ],
            }
        )
        return family.model_copy(update={"model_name": hub.ref.name})

    def source(self, hub: HubModel) -> Source:
        if hub.local is not None:
            cache.touch(self.roots[hub.ref.hub], hub.ref.repo)
            return Source(path=str(hub.local))
        return _source(hub.ref, hub.selection.target or None)

    def start(self, hub: HubModel) -> Pull:
        """Check the disk (507 up front), then start or join the downloads."""
        root, downloads = self.roots[hub.ref.hub], self.downloads[hub.ref.hub]
        folder = cache.snapshot(root, hub.ref.repo, hub.commit)
        files = [f for f in hub.missing if not (folder / f.path).is_file()]
        downloads.check_disk(hub.ref.repo, files)
        cache.touch(root, hub.ref.repo)
        return downloads.pull(hub.ref.name, hub.ref.repo, hub.commit, hub.ref.revision, files)

    def node_files(self, hub: HubModel) -> HubFiles:
        """What a Ray node needs to fetch `hub`'s files itself: the resolved commit and files, and
        this gateway's endpoint and token (so the node asks the same hub, mirror or token)."""
        from huggingface_hub import constants, get_token

        hf = hub.ref.hub == "huggingface"
        sel = hub.selection
        return HubFiles(
            hub.ref.name, hub.ref.hub, hub.ref.repo, hub.commit, hub.ref.revision, sel.target, sel.files,
            constants.ENDPOINT if hf else modelscope.endpoint(), get_token() if hf else None,
            offline(), self.disk_headroom, self.probe_timeout, self.xet,
        )  # fmt: skip

    async def fetch(self, hub: HubModel, pull: Pull) -> Source:
        path = await pull.wait(self.roots[hub.ref.hub], hub.selection.target)
        return Source(path=str(path))

    def stop(self) -> None:
        for downloads in self.downloads.values():
            downloads.stop()

    # ---- the cache ---------------------------------------------------------------------------
    def _users(self, hub: str, repo: str, models: Iterable[RunningModel]) -> list[str]:
        folder = str(cache.repo_dir(self.roots[hub], repo))
        named = (lambda s: s.ms_repo == repo) if hub == "modelscope" else (lambda s: s.hf_repo == repo)
        return [
            m.uid
            for m in models
            if (m.source.path and Path(m.source.path).as_posix().startswith(folder + "/")) or named(m.source)
        ]

    def cached(self, models: Iterable[RunningModel]) -> list[dict[str, Any]]:
        running = list(models)
        return [
            e.describe(self._users(hub, e.repo, running))
            for hub, root in self.roots.items()
            for e in cache.entries(root, hub)
        ]

    def removable(self, name: str, models: Iterable[RunningModel]) -> tuple[str, str, str]:
        """(hub, repo, its name as shown) of a cache name, or a 409 while a model here uses it or
        it downloads."""
        hub, repo = cache.repo_of(name)
        shown = f"{HUB_PREFIX[hub]}{repo}"
        users = self._users(hub, repo, models)
        if users:
            raise Conflict(f"{shown} is in use by {', '.join(users)}; stop them first (shoal stop UID)")
        if self.downloads[hub].active(repo):
            raise Conflict(f"{shown} is being downloaded; wait for it or stop the launch")
        return hub, repo, shown

    def folder(self, hub: str, repo: str) -> Path:
        return cache.repo_dir(self.roots[hub], repo)

    def remove(self, hub: str, repo: str) -> bool:
        """Remove the repo from the gateway's cache; False when it was not there."""
        return cache.remove(self.roots[hub], repo)


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
