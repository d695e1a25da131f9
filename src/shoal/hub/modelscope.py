"""ModelScope's repo API over plain HTTP (httpx), as its own client calls it:

    GET {endpoint}/api/v1/models/ORG/REPO/repo/files?Revision=REV&Recursive=true   the file list
    GET {endpoint}/api/v1/models/ORG/REPO/repo?Revision=REV&FilePath=PATH           a file (Range works)

The endpoint is https:// + MODELSCOPE_DOMAIN (ModelScope's own variable, as its client reads it;
default www.modelscope.cn); a MODELSCOPE_DOMAIN that starts with http:// or https:// (a local
mirror) is taken as the whole endpoint. The file list names no repo commit, so a
snapshot is named by a hash of the listing (paths, sizes, sha256): it changes when a file does.
Public repos only: no token is sent. Errors become Shoal's, naming the repo: 404, 403, 502.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import httpx

from shoal.errors import HubAccessDenied, HubNotFound, HubUnreachable
from shoal.hub.names import HubRef

TIMEOUT = httpx.Timeout(30.0, read=60.0)
CHUNK = 1024 * 1024


class Sink(Protocol):
    def write(self, data: bytes) -> int: ...
    def truncate(self, size: int | None = None) -> int: ...


def endpoint() -> str:
    domain = os.environ.get("MODELSCOPE_DOMAIN", "").strip().rstrip("/") or "www.modelscope.cn"
    return domain if domain.startswith(("http://", "https://")) else "https://" + domain


def _repo_url(repo: str, base: str | None = None) -> str:
    return f"{base or endpoint()}/api/v1/models/{repo}/repo"


@contextmanager
def errors(what: str) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status == 404:
            raise HubNotFound(f"{what} was not found on ModelScope") from None
        if status in (401, 403):
            raise HubAccessDenied(
                f"{what}: ModelScope refused access ({status}); Shoal reads public repos only"
            ) from None
        raise HubUnreachable(f"{what}: ModelScope answered {status}") from None
    except httpx.HTTPError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise HubUnreachable(f"{what}: ModelScope could not be reached ({reason})") from None


def _checked(body: Any, what: str) -> dict[str, Any]:
    """ModelScope answers errors as JSON too ({"Code": ..., "Success": false, "Message": ...})."""
    if not isinstance(body, dict):
        raise HubUnreachable(f"{what}: ModelScope sent no JSON object")
    if body.get("Success") is False or body.get("Code") not in (None, 200):
        message = str(body.get("Message") or body.get("Code"))[:300]
        raise HubNotFound(f"{what} was not found on ModelScope ({message})")
    return body


def list_files(ref: HubRef) -> tuple[str, list[tuple[str, int, str | None]]]:
    """(the snapshot name, [(path, size, sha256)]) of a repo at `ref.revision`."""
    what = f"ModelScope repo {ref.repo!r}"
    with errors(what):
        response = httpx.get(
            f"{_repo_url(ref.repo)}/files",
            params={"Revision": ref.revision, "Recursive": "True"},
            timeout=TIMEOUT,
            follow_redirects=True,
        )
        response.raise_for_status()
    try:
        body = _checked(response.json(), what)
    except ValueError:
        raise HubUnreachable(f"{what}: ModelScope sent no JSON") from None
    try:
        entries = (body.get("Data") or {}).get("Files") or []
        files = sorted(
            (str(f["Path"]), int(f.get("Size") or 0), str(f["Sha256"]) if f.get("Sha256") else None)
            for f in entries
            if isinstance(f, dict) and f.get("Type", "blob") == "blob" and f.get("Path")
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise HubUnreachable(f"{what}: ModelScope sent a file list Shoal cannot read ({exc})") from None
    listing = "\n".join(f"{p} {n} {h or ''}" for p, n, h in files)
    return hashlib.sha1(f"{ref.repo}@{ref.revision}\n{listing}".encode()).hexdigest(), files


def read_range(repo: str, revision: str, path: str, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive) of a file, with one range request."""
    with errors(f"ModelScope file {repo}/{path}"):
        response = httpx.get(
            _repo_url(repo),
            params={"Revision": revision, "FilePath": path},
            headers={"Range": f"bytes={start}-{end}"},
            timeout=TIMEOUT,
            follow_redirects=True,
        )
        response.raise_for_status()
    return response.content[: end - start + 1]  # a server that ignores Range sent it all


def download(
    repo: str, revision: str, path: str, sink: Sink, resume: int, size: int, base: str | None = None
) -> None:
    """The file into `sink` from byte `resume` on (a server that ignores Range starts it over);
    `base`: the endpoint, when not this process's MODELSCOPE_DOMAIN (a Ray node downloading)."""
    what = f"ModelScope file {repo}/{path}"
    headers = {"Range": f"bytes={resume}-"} if resume else {}
    got = resume
    with (
        errors(what),
        httpx.stream(
            "GET",
            _repo_url(repo, base),
            params={"Revision": revision, "FilePath": path},
            headers=headers,
            timeout=TIMEOUT,
            follow_redirects=True,
        ) as response,
    ):
        response.raise_for_status()
        if resume and response.status_code != 206:
            sink.truncate(0)
            got = 0
        for piece in response.iter_bytes(CHUNK):
            sink.write(piece)
            got += len(piece)
    if size and got != size:
        raise HubUnreachable(f"{what}: the download stopped at byte {got} of {size}; the next try resumes it")
