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
Xet, for the files a repo's `.xet` file names (a path a line; `PATH only` makes a plain resolve GET of
that file answer 500 unless it asks a closed Range, so only xet can download it though the reads of
its header before a download still work; `PATH broken` makes its CAS reconstruction answer 404, so
only plain HTTP can), enough of it for the real hf_xet client:
- HEAD|GET resolve also answers X-Xet-Hash and a Link rel="xet-auth" to the read token route
- GET /api/models/ORG/REPO/xet-read-token/REV   X-Xet-Cas-Url (this server's /cas), X-Xet-Access-Token,
                                          X-Xet-Token-Expiration, and the same as JSON
- GET /cas/v2/reconstructions/HASH        404, so the client falls back to v1
- GET /cas/v1/reconstructions/HASH        QueryReconstructionResponse for the file (a Range header: the
                                          chunks covering that part of it): one xorb, 64 KiB chunks,
                                          a term (and a fetch range) per 4 MiB
- GET /cas/xorbs/HASH                     the xorb's bytes (uncompressed chunks, each behind its 8-byte
                                          header), Range answered 206, counted under `xet/ORG/REPO/PATH`
                                          (held by /_hold?after=N when a range starts at or past
                                          offset N, before its first byte, not inside one)
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
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".onnx")
CHUNK = 64 * 1024
XET_CHUNK = 64 * 1024  # xet-core's target chunk size; its limit is twice that
TERM_CHUNKS = 64  # chunks per reconstruction term (4 MiB)
CONTROL_FILES = (".gated", ".xet")


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.stats: dict[str, object] = {}
        self.reset()
        self.hold_after: int | None = None
        self.released = threading.Event()
        self._hashes: dict[Path, tuple[str, str]] = {}
        self.xorbs: dict[str, tuple[Path, str, str]] = {}  # xet file hash, xorb hash -> (file, label, mode)
        self.xorb_bytes: dict[Path, bytes] = {}

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
        return sorted(p for p in repo.rglob("*") if p.is_file() and p.name not in CONTROL_FILES)

    def xet(self, repo: Path, path: str) -> str | None:
        """How `.xet` names the file: None (not served by xet), "both", "only" or "broken"."""
        marks = repo / ".xet"
        for line in marks.read_text().splitlines() if marks.exists() else []:
            name, _, mode = line.strip().partition(" ")
            if name == path:
                return mode.strip() if mode.strip() in ("only", "broken") else "both"
        return None

    def xet_hashes(self, file: Path, label: str, mode: str) -> tuple[str, str]:
        """(file hash, xorb hash) standing in for xet's merkle hashes: the client looks them up, it does
        not recompute them on download."""
        sha256 = self.hashes(file)[1]
        file_hash, xorb_hash = sha256, hashlib.sha256(b"xorb" + bytes.fromhex(sha256)).hexdigest()
        with self.lock:
            self.xorbs[file_hash] = self.xorbs[xorb_hash] = (file, label, mode)
        return file_hash, xorb_hash

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
        if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] == "xet-read-token":
            return self._xet_token(parts[2], parts[3])
        if len(parts) == 4 and parts[0] == "cas" and parts[2] == "reconstructions":
            return self._reconstruction(parts[1], parts[3])
        if len(parts) == 3 and parts[:2] == ["cas", "xorbs"]:
            return self._xorb(parts[2])
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
        if rest or not path or ".." in path.split("/") or not file.is_file() or file.name in CONTROL_FILES:
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
        if ".." in path.split("/") or not file.is_file() or file.name in CONTROL_FILES:
            return self._error(404, "EntryNotFound", f"{path} does not exist", commit)
        git, sha256 = self.hub.hashes(file)
        lfs = file.suffix in LFS_SUFFIXES
        headers = {"X-Repo-Commit": commit, "ETag": f'"{sha256 if lfs else git}"'}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(file.stat().st_size)})
        label = f"{org}/{name}/{path}"
        xet = self.hub.xet(repo, path)
        if xet:
            file_hash, _ = self.hub.xet_hashes(file, f"xet/{label}", xet)
            token_route = f"http://{self.headers.get('Host')}/api/models/{org}/{name}/xet-read-token/{commit}"
            headers.update({"X-Xet-Hash": file_hash, "Link": f'<{token_route}>; rel="xet-auth"'})
            range_header = self.headers.get("Range") or ""
            if xet == "only" and self.command == "GET" and (not range_header or range_header.endswith("-")):
                self.hub.got(label, range_header, self.client_address[0])
                return self._error(500, "XetOnly", f"{path} is served through xet only", commit)
        self._send_file(file, label, headers)

    def _xet_token(self, org: str, name: str) -> None:
        repo = self.hub.repo(org, name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository Not Found")
        if not self._allowed(repo, f"{org}/{name}"):
            return
        cas, token, exp = f"http://{self.headers.get('Host')}/cas", "xet-test-token", int(time.time()) + 3600
        headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)}
        self._json(200, {"casUrl": cas, "accessToken": token, "exp": exp}, headers)

    def _reconstruction(self, version: str, file_hash: str) -> None:
        """A file's reconstruction: terms of up to TERM_CHUNKS chunks of its one xorb covering the
        asked part of it (several terms, so the client writes, and counts, as the bytes come)."""
        found = self.hub.xorbs.get(file_hash)
        if version != "v1" or found is None or found[2] == "broken":
            return self._json(404, {"error": "not found"})
        file, label, _ = found
        size = file.stat().st_size
        start, end = 0, size  # [start, end)
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes=") :].partition("-")
            start, end = int(first or 0), min(size, int(last) + 1 if last else size)
        if start >= size and size > 0:
            return self._json(416, {"error": "range not satisfiable"})
        _, xorb_hash = self.hub.xet_hashes(file, label, found[2])
        url = f"http://{self.headers.get('Host')}/cas/xorbs/{xorb_hash}"
        terms, fetch = [], []
        first_chunk, end_chunk = start // XET_CHUNK, -(-end // XET_CHUNK)
        for at in range(first_chunk, end_chunk, TERM_CHUNKS):
            upto = min(end_chunk, at + TERM_CHUNKS)
            unpacked = min(size, upto * XET_CHUNK) - at * XET_CHUNK
            byte_start = at * (XET_CHUNK + 8)  # each chunk behind its 8-byte header
            chunks = {"start": at, "end": upto}
            terms.append({"hash": xorb_hash, "unpacked_length": unpacked, "range": chunks})
            byte_range = {"start": byte_start, "end": byte_start + (upto - at) * 8 + unpacked - 1}
            fetch.append({"range": chunks, "url": url, "url_range": byte_range})
        body = {"offset_into_first_range": start - first_chunk * XET_CHUNK, "terms": terms,
                "fetch_info": {xorb_hash: fetch}}  # fmt: skip
        self._json(200, body)

    def _xorb(self, xorb_hash: str) -> None:
        """The xorb holding a file: each 64 KiB of it behind a chunk header (version 0, compressed length
        u24 LE, scheme 0 = none, uncompressed length u24 LE)."""
        found = self.hub.xorbs.get(xorb_hash)
        if found is None:
            return self._json(404, {"error": "no such xorb"})
        file, label, _ = found
        with self.hub.lock:
            xorb = self.hub.xorb_bytes.get(file)
            if xorb is None:
                data, out = file.read_bytes(), bytearray()
                for at in range(0, len(data), XET_CHUNK):
                    piece = data[at : at + XET_CHUNK]
                    n = len(piece).to_bytes(3, "little")
                    out += b"\0" + n + b"\0" + n + piece
                xorb = self.hub.xorb_bytes[file] = bytes(out)
        size = len(xorb)
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes=") :].partition("-")
            start, end, status = int(first), min(int(last), size - 1), 206
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.hub.got(label, range_header, self.client_address[0])
        # Held by position, whole: every range that starts before the hold's offset is sent in full,
        # whatever order hf_xet's parallel fetches arrive in (a hold by bytes sent in all could
        # starve the first range, and hf_xet, which writes the file in order, would count nothing).
        self._body(io.BytesIO(xorb), start, end, label, whole=True)

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
        with file.open("rb") as f:
            self._body(f, start, end, label)

    def _body(self, f: BinaryIO, start: int, end: int, label: str, whole: bool = False) -> None:
        """Bytes start..end of `f`, stopping while held (`whole`: held only before the first byte)."""
        try:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                hold = self.hub.hold_after
                if whole:  # by position: a range that begins before the hold's offset is sent in full
                    held = hold is not None and start >= hold and left == end - start + 1
                else:
                    held = hold is not None and int(self.hub.stats["body_bytes"]) >= hold  # type: ignore[call-overload]
                if held:
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
