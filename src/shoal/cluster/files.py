"""Model files for Ray nodes.

A model launched from a local path is read where the gateway runs. A node that sees the same files
(the same host, or shared storage) loads them in place. A node that does not gets a copy: the
gateway reads the files in chunks, puts each chunk in Ray's object store, and the node's agent
writes it under SHOAL_MODEL_CACHE. The copy is kept, so later launches of the same files on that
node start at once; changed files (size or mtime) make a new copy. A hub model's files a node
downloads itself (agent.py, into SHOAL_MODEL_CACHE/hub as the gateway does); only a node that cannot
reach the hub gets a copy of the gateway's download this way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shoal.hub.cache import ROOTS

CHUNK = 32 * 1024 * 1024  # bytes per object-store chunk: bounds the memory a copy holds
DONE = ".complete"  # marks a finished copy
SOURCE = "source.json"  # what a finished copy is a copy of (GET /v1/workers lists it)


@dataclass(frozen=True)
class Manifest:
    """What the gateway has at `root` (a file, or a folder): each file's relative path and size."""

    root: str
    files: tuple[tuple[str, int, int], ...]  # (relative path, "" for a single file; size; mtime in ns)
    key: str  # changes when any file's path, size or mtime changes

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.files)


# status while under way, and once done, by where the files come from
STATUS = {
    "gateway": ("copying", "copied"),
    "hub": ("downloading", "downloaded"),
    "cache": ("cached", "cached"),
}


@dataclass
class CopyProgress:
    """One model's files on their way to one node: what GET /v1/models/{uid} shows on the replica
    being placed there (and on any replica waiting for the same files). `via` says from where:
    "gateway" (a copy of the gateway's files through the object store), "hub" (the node downloads
    them itself), "cache" (the node had them: its own hub cache, or the gateway's files in place)."""

    node: str
    source: str
    total: int
    via: str = "gateway"
    done: int = 0  # bytes the node has written
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    error: str | None = None
    path: str | None = None  # where the node's runner loads them from, once known

    def progress(self) -> dict[str, Any]:
        now = self.ended if self.ended is not None else time.monotonic()
        took = now - self.started
        rate = self.done / took if took > 0 and self.done and self.via != "cache" else None
        left = self.total - self.done
        going, done = STATUS[self.via]
        status = "failed" if self.error else done if self.ended is not None else going
        return {
            "status": status,
            "node": self.node,
            "from": self.via,
            "source": self.source,
            "path": self.path,
            "completed_bytes": self.done,
            "total_bytes": self.total,
            "rate_bytes_per_s": round(rate) if rate else None,
            "eta_s": round(left / rate, 1) if rate and left > 0 else (0.0 if left <= 0 else None),
            "seconds": round(took, 2),
            "error": self.error,
        }


K = TypeVar("K", bound=Hashable)


@contextmanager
def tracked(under_way: dict[K, CopyProgress], key: K, progress: CopyProgress) -> Iterator[CopyProgress]:
    """`progress` listed in `under_way` (GET /v1/workers shows it) while the block runs; then its
    end time, and the error when the block raised."""
    under_way[key] = progress
    try:
        yield progress
    except Exception as exc:
        progress.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        progress.ended = time.monotonic()
        del under_way[key]


def manifest(path: Path) -> Manifest:
    root = path.expanduser().absolute()  # not resolve(): a symlink's own path is what a node must see
    if root.is_file():
        entries = [("", root.stat())]
    else:
        entries = [(str(p.relative_to(root)), p.stat()) for p in sorted(root.rglob("*")) if p.is_file()]
    files = tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in entries)
    stamp = json.dumps([str(root), files])
    return Manifest(str(root), files, hashlib.sha256(stamp.encode()).hexdigest()[:16])


def chunks(m: Manifest) -> Iterator[tuple[str, int, bytes]]:
    """(relative path, offset, bytes) over every file; an empty file yields one empty chunk."""
    root = Path(m.root)
    for rel, _, _ in m.files:
        with open(root / rel if rel else root, "rb") as f:
            offset = 0
            while True:
                data = f.read(CHUNK)
                if data or offset == 0:
                    yield rel, offset, data
                if len(data) < CHUNK:
                    break
                offset += len(data)


# ---- on the node (called by its agent) ----------------------------------------------------------
def _same_files(root: Path, m: Manifest, same_mtime: bool) -> bool:
    try:
        for rel, size, mtime in m.files:
            st = (root / rel if rel else root).stat()
            if st.st_size != size or (same_mtime and st.st_mtime_ns != mtime):
                return False
        return True
    except OSError:
        return False


def _copy_root(cache: Path, m: Manifest) -> Path:
    return cache / m.key / Path(m.root).name


def find(cache: Path, m: Manifest) -> str | None:
    """The path this node loads the model from, or None when the files must be copied here."""
    if _same_files(Path(m.root), m, same_mtime=True):  # this host, or storage shared with it
        return m.root
    if (cache / m.key / DONE).exists():
        return str(_copy_root(cache, m))
    return None


def write_chunk(cache: Path, m: Manifest, rel: str, offset: int, data: bytes) -> None:
    partial = cache / m.key / ".partial" / Path(m.root).name
    target = partial / rel if rel else partial
    target.parent.mkdir(parents=True, exist_ok=True)
    # chunks of a file arrive in order (an actor runs its calls one at a time): the first truncates
    with open(target, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)


def finish(cache: Path, m: Manifest) -> str:
    """Check every file arrived whole, then move the copy into place."""
    folder = cache / m.key
    partial = folder / ".partial" / Path(m.root).name
    if not _same_files(partial, m, same_mtime=False):
        raise OSError(f"the copy of {m.root} on this node is incomplete")
    final = _copy_root(cache, m)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    partial.rename(final)
    shutil.rmtree(folder / ".partial", ignore_errors=True)
    (folder / SOURCE).write_text(
        json.dumps({"source": m.root, "bytes": m.total_bytes, "files": len(m.files)})
    )
    (folder / DONE).touch()
    return str(final)


def prune(cache: Path, m: Manifest, in_use: set[str]) -> list[str]:
    """Remove the older finished copies of the same source (its files changed since: `m` replaces
    them), except those a live runner loads from (`in_use`: paths). Returns what was removed."""
    removed = []
    for entry in listing(cache):
        path = entry["path"]
        if entry["complete"] and entry["source"] == m.root and entry["key"] != m.key and path not in in_use:
            shutil.rmtree(cache / str(entry["key"]), ignore_errors=True)
            removed.append(str(path))
    return removed


def listing(cache: Path) -> list[dict[str, object]]:
    """Every copy in this node's cache: finished ones, and any copy still arriving (or left
    unfinished by a copy that failed)."""
    found: list[dict[str, object]] = []
    for folder in sorted(cache.iterdir()) if cache.is_dir() else []:
        if not folder.is_dir() or folder.name in ROOTS.values():  # the hub caches are listed apart
            continue
        complete = (folder / DONE).exists()
        try:
            about = json.loads((folder / SOURCE).read_text()) if complete else {}
            marks = (folder / DONE, folder / SOURCE)
            on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p not in marks)
            copy = next((p for p in folder.iterdir() if p.name not in (DONE, SOURCE, ".partial")), None)
        except (OSError, ValueError):  # a copy being moved into place, or removed, meanwhile
            continue
        found.append({
            "key": folder.name,
            "source": about.get("source"),
            "path": str(copy) if copy is not None else None,
            "bytes": on_disk,
            "complete": complete,
        })  # fmt: skip
    return found
