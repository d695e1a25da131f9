"""A small Hugging Face Hub on loopback, for the tests: it serves repos the way huggingface.co serves
them to `huggingface_hub` (the real client, pointed here with HF_ENDPOINT).

    python tests/hubserver.py ROOT PORT [HOST]   (HOST: the address to listen on, 127.0.0.1 unless given)

ROOT/ORG/REPO/... are the repos' files (symbolic links are followed). Routes:
- GET /api/models/ORG/REPO[/revision/REV]  model info with siblings (sizes, blob ids, LFS sha256)
- HEAD|GET /ORG/REPO/resolve/REV/PATH     a file: X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size,
                                          Accept-Ranges, Range requests answered 206
- a missing repo or file: 404 with X-Error-Code RepoNotFound / EntryNotFound, as the Hub answers
- a repo holding a file `.gated` is gated: 401 X-Error-Code GatedRepo unless the request carries
  `Authorization: Bearer <the file's text>`
ModelScope's routes, as its repo API answers them (MODELSCOPE_DOMAIN points here):
- GET /api/v1/models/ORG/REPO/repo/files?Revision=REV&Recursive=True  {"Code": 200, "Data": {"Files":
                                          [{"Path", "Name", "Size", "Sha256", "Type": "blob"}]}}
- GET /api/v1/models/ORG/REPO/repo?Revision=REV&FilePath=PATH         a file, Range answered 206
- a missing repo or file: 404 with {"Code": 10010205001, "Success": false, "Message": ...}
Test controls (not Hub routes): GET /_stats (requests, file body bytes sent in all and per path,
and each file GET as [path, Range header, client address]), POST /_reset, POST /_hold?after=N
(file bodies stop after N bytes in all, until POST /_release). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".onnx")
CHUNK = 64 * 1024


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.stats: dict[str, object] = {}
        self.reset()
        self.hold_after: int | None = None
        self.released = threading.Event()
        self._hashes: dict[Path, tuple[str, str]] = {}

    def reset(self) -> None:
        with self.lock:
            self.stats = {"requests": 0, "body_bytes": 0, "paths": {}, "gets": []}

    def count(self, path: str, sent: int) -> None:
        with self.lock:
            self.stats["body_bytes"] = int(self.stats["body_bytes"]) + sent  # type: ignore[call-overload]
            paths: dict[str, int] = self.stats["paths"]  # type: ignore[assignment]
            paths[path] = paths.get(path, 0) + sent

    def got(self, path: str, range_header: str | None, client: str) -> None:
        with self.lock:
            self.stats["gets"].append([path, range_header or "", client])  # type: ignore[union-attr]

    def repo(self, org: str, name: str) -> Path | None:
        folder = self.root / org / name
        return folder if folder.is_dir() and ".." not in (org, name) else None

    def files(self, repo: Path) -> list[Path]:
        return sorted(p for p in repo.rglob("*") if p.is_file() and p.name != ".gated")

    def hashes(self, file: Path) -> tuple[str, str]:
        """(git blob sha1, sha256) of a file, computed once."""
        if file not in self._hashes:
            data = file.read_bytes()
            git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self._hashes[file] = (git, hashlib.sha256(data).hexdigest())
        return self._hashes[file]

    def commit(self, repo: Path) -> str:
        listing = "\n".join(f"{p.relative_to(repo)} {p.stat().st_size}" for p in self.files(repo))
        return hashlib.sha1(listing.encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers)

    def _allowed(self, repo: Path, name: str) -> bool:
        gate = repo / ".gated"
        if not gate.exists():
            return True
        if self.headers.get("Authorization", "") == f"Bearer {gate.read_text().strip()}":
            return True
        self._error(401, "GatedRepo", f"Access to model {name} is restricted. You must have access to it.")
        return False

    def do_POST(self) -> None:
        url = urlparse(self.path)
        hub = self.hub
        if url.path == "/_reset":
            hub.reset()
        elif url.path == "/_hold":
            hub.released.clear()
            hub.hold_after = int(parse_qs(url.query)["after"][0])
        elif url.path == "/_release":
            hub.hold_after = None
            hub.released.set()
        else:
            return self._json(404, {"error": "no such route"})
        self._json(200, {"ok": True})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        with self.hub.lock:
            self.hub.stats["requests"] = int(self.hub.stats["requests"]) + 1  # type: ignore[call-overload]
        if parts == ["_stats"]:
            with self.hub.lock:
                return self._json(200, self.hub.stats)
        if len(parts) >= 6 and parts[:3] == ["api", "v1", "models"] and parts[5] == "repo":
            return self._modelscope(parts[3], parts[4], parts[6:], parse_qs(url.query))
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models":
            return self._info(parts[2:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(parts[0], parts[1], "/".join(parts[4:]))
        self._error(404, "RepoNotFound", "Repository Not Found")

    def _info(self, parts: list[str]) -> None:
        org, name = parts[0], parts[1] if len(parts) > 1 else ""
        repo = self.hub.repo(org, name)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
        if not self._allowed(repo, f"{org}/{name}"):
            return
        siblings = []
        for file in self.hub.files(repo):
            git, sha256 = self.hub.hashes(file)
            size = file.stat().st_size
            entry: dict[str, object] = {"rfilename": str(file.relative_to(repo)), "size": size, "blobId": git}
            if file.suffix in LFS_SUFFIXES:
                entry["lfs"] = {"sha256": sha256, "size": size, "pointerSize": 134}
            siblings.append(entry)
        gated = (repo / ".gated").exists()
        body = {
            "_id": f"{org}{name}", "id": f"{org}/{name}", "modelId": f"{org}/{name}",
            "sha": self.hub.commit(repo), "private": False, "gated": "manual" if gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        }  # fmt: skip
        self._json(200, body)

    def _modelscope(self, org: str, name: str, rest: list[str], query: dict[str, list[str]]) -> None:
        repo = self.hub.repo(org, name)
        missing = {"Code": 10010205001, "Success": False, "Message": f"model {org}/{name} does not exist"}
        if repo is None:
            return self._json(404, missing)
        if rest == ["files"]:
            files = []
            for file in self.hub.files(repo):
                path = str(file.relative_to(repo))
                files.append({"Name": file.name, "Path": path, "Size": file.stat().st_size,
                              "Sha256": self.hub.hashes(file)[1], "Type": "blob"})  # fmt: skip
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": files}})
        path = (query.get("FilePath") or [""])[0]
        file = repo / path
        if rest or not path or ".." in path.split("/") or not file.is_file() or file.name == ".gated":
            return self._json(404, {**missing, "Message": f"file {path} does not exist"})
        self._send_file(file, f"ms/{org}/{name}/{path}", {})

    def _resolve(self, org: str, name: str, path: str) -> None:
        repo = self.hub.repo(org, name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository Not Found")
        if not self._allowed(repo, f"{org}/{name}"):
            return
        commit = self.hub.commit(repo)
        file = repo / path
        if ".." in path.split("/") or not file.is_file() or file.name == ".gated":
            return self._error(404, "EntryNotFound", f"{path} does not exist", commit)
        git, sha256 = self.hub.hashes(file)
        lfs = file.suffix in LFS_SUFFIXES
        headers = {"X-Repo-Commit": commit, "ETag": f'"{sha256 if lfs else git}"'}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(file.stat().st_size)})
        self._send_file(file, f"{org}/{name}/{path}", headers)

    def _send_file(self, file: Path, label: str, headers: dict[str, str]) -> None:
        """A file's bytes (a Range request answered 206), counted under `label`."""
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes=") :].partition("-")
            start = int(first) if first else max(0, size - int(last))
            end = min(int(last), size - 1) if first and last else size - 1
            status = 206
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.hub.got(label, range_header, self.client_address[0])
        self._body(file, start, end, label)

    def _body(self, file: Path, start: int, end: int, label: str) -> None:
        try:
            with file.open("rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    hold = self.hub.hold_after
                    if hold is not None and int(self.hub.stats["body_bytes"]) >= hold:  # type: ignore[call-overload]
                        self.hub.released.wait()
                        continue
                    piece = f.read(min(CHUNK, left))
                    self.wfile.write(piece)
                    left -= len(piece)
                    self.hub.count(label, len(piece))
        except (BrokenPipeError, ConnectionResetError):
            pass


def main() -> None:
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    Handler.hub = Hub(root)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"hub serving {root} on {host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
