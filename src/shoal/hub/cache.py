"""The model cache: hub downloads under SHOAL_MODEL_CACHE/hub (Hugging Face) and
SHOAL_MODEL_CACHE/modelscope (ModelScope), both in Hugging Face's own cache layout, so
`huggingface_hub` (offline too) and the `hf cache` commands read the first as theirs:

    models--ORG--REPO/blobs/ETAG                  a file's bytes, named by its etag
    models--ORG--REPO/blobs/ETAG.shoal.incomplete what a download has so far (resumed from here)
    models--ORG--REPO/snapshots/COMMIT/PATH       a relative link to its blob
    models--ORG--REPO/refs/REVISION               the commit a revision (main) last resolved to
    models--ORG--REPO/.shoal-last-use             touched whenever a launch uses the repo
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import InvalidRequest
from shoal.hub.names import HF_PREFIXES, HUB_PREFIX, MODELSCOPE_PREFIXES, PART

INCOMPLETE = ".shoal.incomplete"
ROOTS = {"huggingface": "hub", "modelscope": "modelscope"}  # each hub's folder under SHOAL_MODEL_CACHE
LAST_USE = ".shoal-last-use"


def roots(base: Path) -> dict[str, Path]:
    """Each hub's cache root under SHOAL_MODEL_CACHE (the gateway's, or a Ray node's)."""
    return {hub: base / folder for hub, folder in ROOTS.items()}


def repo_dir(root: Path, repo: str) -> Path:
    return root / ("models--" + repo.replace("/", "--"))


def snapshot(root: Path, repo: str, commit: str) -> Path:
    return repo_dir(root, repo) / "snapshots" / commit


def cached_commit(root: Path, repo: str, revision: str) -> str | None:
    """The commit `revision` pointed to when it was last downloaded (read offline)."""
    ref = repo_dir(root, repo) / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def has_files(root: Path, repo: str, commit: str, paths: list[str]) -> bool:
    folder = snapshot(root, repo, commit)
    return all((folder / p).is_file() for p in paths)


def touch(root: Path, repo: str) -> None:
    path = repo_dir(root, repo) / LAST_USE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def repo_of(name: str) -> tuple[str, str]:
    """(hub, ORG/REPO) from a cache name: hf.co/ORG/REPO, modelscope.cn/ORG/REPO, ORG/REPO or
    models--ORG--REPO (Hugging Face unless the name says ModelScope)."""
    lowered = name.lower()
    hub, prefix = "huggingface", next((p for p in HF_PREFIXES if lowered.startswith(p)), None)
    if prefix is None:
        prefix = next((p for p in MODELSCOPE_PREFIXES if lowered.startswith(p)), None)
        hub = "modelscope" if prefix else "huggingface"
    rest = name[len(prefix or "") :].split(":", 1)[0].strip("/")
    if rest.startswith("models--"):
        rest = rest.removeprefix("models--").replace("--", "/", 1)
    parts = rest.split("/")
    if len(parts) != 2 or not all(PART.match(p) for p in parts) or ".." in parts:
        raise InvalidRequest(
            f"{name!r} is not a cached model name (hf.co/ORG/REPO or modelscope.cn/ORG/REPO)"
        )
    return hub, "/".join(parts)


@dataclass(frozen=True)
class CacheEntry:
    hub: str
    repo: str
    path: Path
    size: int  # bytes of complete files
    partial: int  # bytes of downloads in progress or interrupted
    files: int
    revisions: dict[str, str]  # revision → commit
    last_use: float | None
    modified: float

    def describe(self, uids: list[str]) -> dict[str, Any]:
        return {
            "name": f"{HUB_PREFIX[self.hub]}{self.repo}",
            "hub": self.hub,
            "repo": self.repo,
            "revision": self.revisions.get("main") or next(iter(self.revisions.values()), None),
            "revisions": self.revisions,
            "size_bytes": self.size,
            "incomplete_bytes": self.partial,
            "files": self.files,
            "path": str(self.path),
            "last_used": self.last_use,
            "modified": self.modified,
            "model_uids": uids,
        }


def entries(root: Path, hub: str = "huggingface") -> list[CacheEntry]:
    """Every repo in the cache (none when the cache does not exist yet)."""
    out: list[CacheEntry] = []
    if not root.is_dir():
        return out
    for folder in sorted(root.glob("models--*--*")):
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        size = partial = files = 0
        for blob in (folder / "blobs").glob("*"):
            try:
                n = blob.stat().st_size
            except OSError:
                continue
            if blob.name.endswith(".incomplete"):
                partial += n
            elif not blob.name.endswith(".lock"):
                size, files = size + n, files + 1
        revisions = {}
        for ref in (folder / "refs").glob("*"):
            try:
                revisions[ref.name] = ref.read_text().strip()
            except OSError:
                continue
        last = folder / LAST_USE
        out.append(
            CacheEntry(
                hub,
                repo,
                folder,
                size,
                partial,
                files,
                revisions,
                last.stat().st_mtime if last.exists() else None,
                folder.stat().st_mtime,
            )
        )
    return out


def remove(root: Path, repo: str) -> bool:
    folder = repo_dir(root, repo)
    if not folder.is_dir():
        return False
    shutil.rmtree(folder)
    return True


def free_bytes(root: Path) -> int:
    """Free bytes on the disk that holds the cache (its nearest existing parent)."""
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def link(root: Path, repo: str, commit: str, path: str, etag: str) -> Path:
    """snapshots/COMMIT/PATH → ../../blobs/ETAG, as huggingface_hub links them."""
    target = snapshot(root, repo, commit) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = repo_dir(root, repo) / "blobs" / etag
    relative = os.path.relpath(blob, target.parent)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(relative)
    return target


def write_ref(root: Path, repo: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = repo_dir(root, repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
