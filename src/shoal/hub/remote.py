"""What a hub says about a repo before anything is downloaded, through `huggingface_hub` (so
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply as they do for every Hugging Face tool), or through
hub/modelscope.py for ModelScope (HF_HUB_OFFLINE=1 keeps it offline too): the file
list with sizes and the commit, which files a launch needs, and the estimate's inputs read with
HTTP range requests (the GGUF header, config.json, the safetensors headers). Hub errors become
Shoal's: a missing repo or file 404, a gated or private one 403, an unreachable hub 502.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from shoal.catalog.estimate import RemoteWeights, gguf_shape
from shoal.errors import HubAccessDenied, HubNotFound, HubUnreachable, InsufficientDisk, InvalidRequest
from shoal.hub import media, modelscope
from shoal.hub.names import HUB_PREFIX, HubRef

GGUF_FIRST_READ = 2 * 1024**2  # the first read of a GGUF header; doubled while it is truncated
GGUF_HEADER_LIMIT = 64 * 1024**2  # a header that needs more than this is not estimated from it
SMALL_FILE = 4 * 1024**2  # config.json and friends are read whole
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# Weights a folder launch never loads when safetensors are there (other frameworks, exports).
_SKIP = re.compile(
    r"(^|/)(onnx|openvino|coreml|original|flax|tf|\.git)/|\.(gguf|h5|msgpack|ot|onnx|tflite|mlmodel|pt|pth|ckpt)$"
    r"|(^|/)(pytorch_model|tf_model|flax_model|rust_model)[^/]*$"
)
_FOLDER_MARKERS = ("config.json", "modules.json", "model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # where the hub's listing gives it (ModelScope: the cache's blob name)


@dataclass(frozen=True)
class RemoteRepo:
    repo: str
    commit: str
    files: tuple[RemoteFile, ...]
    hub: str = "huggingface"
    revision: str = "main"  # what file requests name (ModelScope's files are read by revision)

    def get(self, path: str) -> RemoteFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class Selection:
    """What a launch of a hub name needs: its format and type, the files, and the path the engine
    loads (a GGUF file, or "" for the repo's folder)."""

    model_format: str
    model_type: str
    files: tuple[RemoteFile, ...]
    target: str
    quantization: str

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """huggingface_hub's exceptions as Shoal's, naming the repo or file."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError as exc:  # a repo id the hub's rules refuse ("--", "..", ".git")
        raise InvalidRequest(f"{what}: not a valid hub repo name ({_first_line(exc)})") from None
    except errors.GatedRepoError as exc:
        raise HubAccessDenied(
            f"{what} is gated: accept its terms on the hub and set HF_TOKEN to a token that has access "
            f"({_first_line(exc)})"
        ) from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as exc:
        raise HubNotFound(f"{what} was not found on the hub ({_first_line(exc)})") from None
    except errors.OfflineModeIsEnabled:
        raise HubUnreachable(f"{what} is not in the cache and HF_HUB_OFFLINE=1 forbids the hub") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAccessDenied(f"{what}: the hub refused access ({status}); check HF_TOKEN") from None
        if status == 404:
            raise HubNotFound(f"{what} was not found on the hub") from None
        raise HubUnreachable(f"{what}: the hub answered {status}: {_first_line(exc)}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InsufficientDisk(f"{what}: the cache's disk is full ({exc})") from None
        raise HubUnreachable(f"{what}: the hub could not be reached ({type(exc).__name__}: {exc})") from None
    except httpx2.HTTPError as exc:
        raise HubUnreachable(f"{what}: the hub could not be reached ({type(exc).__name__}: {exc})") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def repo_info(ref: HubRef) -> RemoteRepo:
    """The repo's files with their sizes, and the commit its revision points to."""
    if ref.hub == "modelscope":
        snapshot, listed = modelscope.list_files(ref)
        files = tuple(RemoteFile(path, size, sha) for path, size, sha in listed)
        return RemoteRepo(ref.repo, snapshot, files, "modelscope", ref.revision)
    from huggingface_hub import HfApi

    with hub_errors(f"hub repo {ref.repo!r}"):
        info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True)
    files = tuple(RemoteFile(s.rfilename, int(s.size or 0)) for s in info.siblings or [])
    if not info.sha:
        raise HubUnreachable(f"hub repo {ref.repo!r}: the hub did not say which commit it serves")
    return RemoteRepo(ref.repo, info.sha, files)


def select(
    ref: HubRef,
    remote: RemoteRepo,
    model_type: str | None,
    model_format: str | None = None,
    index: dict[str, Any] | None = None,
    variant: str | None = None,
) -> Selection:
    """Which files a launch of `ref` needs (InvalidRequest or HubNotFound naming what is there).
    `model_format` is a catalog spec's (None for a hub name: the files say it); `index` is the
    repo's model_index.json, and `variant` the launch's (fp16), for a diffusers pipeline."""
    detected = (
        media.detect(remote) if model_format is None and ref.file is None and ref.quant is None else None
    )
    if model_format in media.MEDIA_FORMATS or detected is not None:
        fmt = model_format or detected
        assert fmt is not None
        kind = media.MEDIA_TYPES.get(fmt, model_type or "audio")
        if model_type is not None and model_format is None and model_type != kind:
            raise InvalidRequest(
                f"hub repo {ref.repo!r} is a {fmt} model, which launches as model_type {kind!r}, "
                f"not {model_type!r}"
            )
        files, target = media.select_files(remote, fmt, ref.file, index, variant)
        return Selection(fmt, model_type or kind, files, target, "none")
    if model_type in ("audio", "image"):
        raise InvalidRequest(
            f"hub repo {ref.repo!r} holds neither a CTranslate2 Whisper model (model.bin and "
            "vocabulary.*: audio) nor a diffusers pipeline (model_index.json: image); other "
            f"{model_type} models launch from a catalog entry"
        )
    ggufs = [f for f in remote.files if f.path.endswith(".gguf")]
    names = {f.path for f in remote.files}
    if ref.file:
        chosen = remote.get(ref.file)
        if chosen is None:
            raise HubNotFound(
                f"hub repo {ref.repo!r} has no file {ref.file!r}; its GGUF files: "
                + (", ".join(f.path for f in ggufs) or "none")
            )
        return _gguf(ref, remote, chosen, model_type)
    folder = any(m in names for m in _FOLDER_MARKERS) or any(n.endswith(".safetensors") for n in names)
    if ref.quant is None and folder:
        return _folder(remote, model_type)
    if not ggufs:
        hint = f" (a safetensors folder: launch {HUB_PREFIX[ref.hub]}{ref.repo} without a tag)"
        raise InvalidRequest(f"hub repo {ref.repo!r} holds no GGUF files" + (hint if folder else ""))
    if ref.quant is not None:
        matching = [f for f in ggufs if _has_quant(f.path, ref.quant)]
    else:  # Ollama's default: Q4_K_M when there is one, else the only quantization there is
        matching = [f for f in ggufs if _has_quant(f.path, "Q4_K_M")] or ggufs
    quants = sorted({_quant_of(f.path) for f in ggufs})
    if ref.quant is not None and not matching:
        raise HubNotFound(f"hub repo {ref.repo!r} has no {ref.quant} GGUF; it has: {', '.join(quants)}")
    firsts = {_shard_base(f.path) for f in matching}
    if len(firsts) > 1:
        raise InvalidRequest(
            f"hub repo {ref.repo!r} has several GGUF files ({', '.join(sorted(firsts))}); name one with "
            f"{HUB_PREFIX[ref.hub]}{ref.repo}:QUANT (one of {', '.join(quants)}) or "
            f"{HUB_PREFIX[ref.hub]}{ref.repo}/FILE.gguf"
        )
    return _gguf(ref, remote, min(matching, key=lambda f: f.path), model_type)


def _has_quant(path: str, quant: str) -> bool:
    stem = _SHARD.sub("", path.rsplit("/", 1)[-1]).removesuffix(".gguf").lower()
    return re.search(rf"(^|[-._]){re.escape(quant.lower())}$", stem) is not None


def _quant_of(path: str) -> str:
    stem = _SHARD.sub("", path.rsplit("/", 1)[-1]).removesuffix(".gguf")
    return re.split(r"[-.]", stem)[-1]


def _shard_base(path: str) -> str:
    return _SHARD.sub(".gguf", path)


def _gguf(ref: HubRef, remote: RemoteRepo, chosen: RemoteFile, model_type: str | None) -> Selection:
    """One GGUF, or every shard of a split one (the engine is given the first)."""
    files = [chosen]
    if _SHARD.search(chosen.path):
        base = _shard_base(chosen.path)
        files = sorted((f for f in remote.files if _shard_base(f.path) == base), key=lambda f: f.path)
    quant = ref.quant or _quant_of(chosen.path)
    kind = model_type or "LLM"
    fmt = "ggufv2"
    return Selection(fmt, kind, tuple(files), files[0].path, quant)


def _folder(remote: RemoteRepo, model_type: str | None) -> Selection:
    names = {f.path for f in remote.files}
    sentence_transformers = "modules.json" in names or "sentence_bert_config.json" in names
    kind = model_type or ("embedding" if sentence_transformers else "LLM")
    fmt = {"embedding": "sentence_transformers", "rerank": "cross_encoder"}.get(kind, "safetensors")
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    files = tuple(
        f
        for f in remote.files
        if not (has_safetensors and _SKIP.search(f.path)) and not f.path.endswith(".gguf")
    )
    return Selection(fmt, kind, files, "", "none")


# ---- reading before download --------------------------------------------------------------------
def read_range(remote: RemoteRepo, path: str, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive) of a file at the repo's commit, with one range request."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable(f"{remote.repo}/{path}: HF_HUB_OFFLINE=1 forbids reading it from the hub")
    if remote.hub == "modelscope":
        return modelscope.read_range(remote.repo, remote.revision, path, start, end)
    url = hf_hub_url(remote.repo, path, revision=remote.commit)
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}"}
    with hub_errors(f"hub file {remote.repo}/{path}"):
        response = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(response)
        data = bytes(response.content)
    return data[: end - start + 1]  # a server that ignores Range sent the whole file: keep the range


def remote_weights(remote: RemoteRepo, selection: Selection) -> tuple[RemoteWeights, int | None]:
    """The estimate's inputs from the hub, and the model's context length where it says one."""
    weight_files = [f for f in selection.files if _is_weights(f.path)]
    weights = sum(f.size for f in weight_files)
    if selection.model_format == "ggufv2":
        shape = _gguf_header(remote, selection.files[0])
        return RemoteWeights(weights, gguf=shape), shape.context_length
    config = _config(remote, selection)
    tensors: list[tuple[str, int, int]] = []
    for f in weight_files:
        if f.path.endswith(".safetensors"):
            tensors.extend(_safetensors_header(remote, f.path))
    from shoal.catalog.estimate import hf_shape

    # An LLM's context length; a media model's configs (a text encoder's 77 tokens) say none of its own.
    context = (
        hf_shape(config, tensors).context_length
        if config and selection.model_format not in media.MEDIA_FORMATS
        else None
    )
    return RemoteWeights(weights, config=config, tensors=tuple(tensors)), context


def _gguf_header(remote: RemoteRepo, first: RemoteFile) -> Any:
    """The GGUF header, read as gguf-parser does: the first megabytes, then the next ones while it
    is truncated (vocabularies make it long), never past GGUF_HEADER_LIMIT."""
    buf = b""
    want = min(GGUF_FIRST_READ, first.size)
    while True:
        buf += read_range(remote, first.path, len(buf), want - 1)
        try:
            return gguf_shape(buf)
        except ValueError as exc:
            if "truncated" not in str(exc) or want >= min(first.size, GGUF_HEADER_LIMIT):
                raise InvalidRequest(f"hub file {remote.repo}/{first.path}: {exc}") from None
        want = min(want * 2, first.size, GGUF_HEADER_LIMIT)


def _is_weights(path: str) -> bool:
    return path.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth")) and "/onnx/" not in f"/{path}"


def _config(remote: RemoteRepo, selection: Selection) -> dict[str, Any] | None:
    """config.json at the top, or in a sentence-transformers module folder, read whole."""
    candidates = ["config.json", *sorted(f.path for f in selection.files if f.path.endswith("/config.json"))]
    for path in candidates:
        f = remote.get(path)
        if f is None or f.size > SMALL_FILE or f.size == 0:
            continue
        try:
            config = json.loads(read_range(remote, path, 0, f.size - 1))
        except ValueError:
            continue
        if isinstance(config, dict) and {"hidden_size", "n_embd", "d_model", "text_config"} & set(config):
            return config
    return None


def _safetensors_header(remote: RemoteRepo, path: str) -> list[tuple[str, int, int]]:
    """(dtype, elements, bytes) per tensor from the 8-byte length and the JSON header after it."""
    import struct

    (n,) = struct.unpack("<Q", read_range(remote, path, 0, 7))
    if n > 100_000_000:
        raise InvalidRequest(f"hub file {remote.repo}/{path}: a safetensors header of {n} bytes")
    try:
        header = json.loads(read_range(remote, path, 8, 8 + n - 1))
        out = []
        for name, t in header.items():
            if name != "__metadata__":
                start, end = t["data_offsets"]
                numel = 1
                for d in t["shape"]:
                    numel *= int(d)
                out.append((str(t["dtype"]), numel, int(end) - int(start)))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequest(
            f"hub file {remote.repo}/{path} has no readable safetensors header ({exc})"
        ) from None
