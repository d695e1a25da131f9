"""Is a local path model weights? Checked when a path is registered and before it is launched.

Only a regular file or a folder is read, never a device, a FIFO or a socket (reading /dev/zero never
ends), nor anything under /proc, /sys or /dev (/proc/self/environ is a "regular" file holding the
server's environment); symbolic links are followed first, so a link cannot lead there either. Then
the format: a GGUF file starts with the bytes `GGUF`; a Hugging Face or sentence-transformers folder
holds config.json, modules.json or weight files; the other formats hold their own files. Nothing but a
few bytes of one file is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shoal.errors import InvalidRequest

GGUF_MAGIC = b"GGUF"
SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
HF_FORMATS = ("pytorch", "safetensors", "sentence_transformers", "cross_encoder", "gptq", "awq", "fp8")
# A Hugging Face-style folder shows one of these at its top level (or in a folder one level down).
HF_MARKERS = (
    "config.json", "modules.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "*.safetensors",
)  # fmt: skip
# Other folder formats: the files that show one (glob patterns, top level or one level down).
FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "diffusers": ("model_index.json",),
    "ctranslate2": ("model.bin",),
    "rapidocr": ("*.onnx",),
}
ONNX_FORMATS = ("piper", "hibari")  # a .onnx file, or a folder that holds one


def _kind(path: Path) -> str:
    """'file' or 'folder' for a regular file or folder outside the system trees; else InvalidRequest."""
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise InvalidRequest(f"model path {path} does not exist") from None
    except (OSError, RuntimeError) as exc:  # a link loop, no permission
        raise InvalidRequest(f"model path {path} cannot be read: {exc}") from None
    for root in SYSTEM_ROOTS:
        if real == root or root in real.parents:
            raise InvalidRequest(f"model path {path} is in {root}, which holds no model weights")
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise InvalidRequest(f"model path {path} is not a regular file or folder (a device, FIFO or socket)")


def check_path(path: Path) -> None:
    """A regular file or folder outside /proc, /sys and /dev (any format)."""
    _kind(path)


def _has(folder: Path, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        for found in (*folder.glob(pattern), *folder.glob(f"*/{pattern}")):
            try:
                _kind(found)  # a marker that is a link to a device or to /proc does not count
            except InvalidRequest:
                continue
            return True
    return False


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:  # a regular file (checked): the read ends
            return f.read(len(magic)) == magic
    except OSError:
        return False


def check_weights(path: Path, model_format: str) -> None:
    """Raise InvalidRequest unless `path` looks like weights of `model_format`."""
    kind = _kind(path)
    if model_format in ("ggufv2", "gguf"):
        if kind != "file":
            raise InvalidRequest(f"model path {path} is a folder; a {model_format} model is one .gguf file")
        if not _starts_with(path, GGUF_MAGIC):
            raise InvalidRequest(f"model path {path} is not a GGUF file (it does not start with 'GGUF')")
        return
    markers = HF_MARKERS if model_format in HF_FORMATS else FOLDER_MARKERS.get(model_format)
    if markers is not None:
        if kind != "folder":
            raise InvalidRequest(
                f"model path {path} is a file; a {model_format} model is a folder ({', '.join(markers)})"
            )
        if not _has(path, markers):
            raise InvalidRequest(
                f"model path {path} is not a {model_format} folder: it holds none of {', '.join(markers)}"
            )
        return
    if model_format in ONNX_FORMATS:
        onnx = path.suffix == ".onnx" if kind == "file" else _has(path, ("*.onnx", "assets/*.onnx"))
        if not onnx:
            raise InvalidRequest(f"model path {path} is not a {model_format} voice (no .onnx file)")
