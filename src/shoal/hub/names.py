"""Hub references in model names, Ollama's spelling: `hf.co/ORG/REPO` (a safetensors or
sentence-transformers folder, or a repo of GGUFs), `hf.co/ORG/REPO:QUANT` and
`hf.co/ORG/REPO/FILE.gguf` (one GGUF). `huggingface.co/` works too, and `modelscope.cn/...` names
the same forms on ModelScope. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.errors import InvalidRequest

HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://hf.co/", "https://huggingface.co/")
MODELSCOPE_PREFIXES = ("modelscope.cn/", "https://modelscope.cn/", "https://www.modelscope.cn/")
PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the Hub's rule for user and repo names
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UID_BAD = re.compile(r"[^A-Za-z0-9._-]")
HUB_PREFIX = {"huggingface": "hf.co/", "modelscope": "modelscope.cn/"}  # how names spell each hub
DEFAULT_REVISION = {"huggingface": "main", "modelscope": "master"}


@dataclass(frozen=True)
class HubRef:
    """One model on a hub: the repo, and for GGUF repos which file (or which quantization)."""

    hub: str  # "huggingface" or "modelscope"
    repo: str  # ORG/REPO
    file: str | None = None  # a .gguf path inside the repo
    quant: str | None = None  # Ollama's tag: the quantization in a GGUF file name
    revision: str = "main"

    @property
    def name(self) -> str:
        """The canonical spelling, as launches, the cache and Ollama's routes show it."""
        tail = f"/{self.file}" if self.file else f":{self.quant}" if self.quant else ""
        return f"{HUB_PREFIX[self.hub]}{self.repo}{tail}"

    def default_uid(self) -> str:
        """A model uid for a launch that names none: the repo's name, or the GGUF file's stem, or
        the repo's name and the quantization (uids allow letters, digits, '.', '_' and '-')."""
        base = self.repo.split("/")[1]
        if self.file:
            base = self.file.rsplit("/", 1)[-1].removesuffix(".gguf")
        elif self.quant:
            base = f"{base}-{self.quant}"
        return _UID_BAD.sub("-", base)[:128]


def is_hub_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(HF_PREFIXES) or lowered.startswith(MODELSCOPE_PREFIXES)


def parse(name: str) -> HubRef | None:
    """The hub reference in a model name, or None for a catalog name. Raises InvalidRequest (400)
    for a hub name that is malformed."""
    lowered = name.lower()
    hub, prefix = "huggingface", next((p for p in HF_PREFIXES if lowered.startswith(p)), None)
    if prefix is None:
        hub, prefix = "modelscope", next((p for p in MODELSCOPE_PREFIXES if lowered.startswith(p)), None)
    if prefix is None:
        return None
    short = HUB_PREFIX[hub]
    rest = name[len(prefix) :].strip("/")
    quant = None
    parts = rest.split("/")
    if len(parts) == 2 and ":" in parts[1]:
        parts[1], quant = parts[1].split(":", 1)
        if quant.lower() == "latest":  # Ollama's default tag: the repo's default file
            quant = None
    if len(parts) < 2 or not all(PART.match(p) for p in parts[:2]):
        raise InvalidRequest(
            f"{name!r} is not a hub model name: write {short}ORG/REPO, {short}ORG/REPO:QUANT or "
            f"{short}ORG/REPO/FILE.gguf"
        )
    if quant is not None and not _QUANT.match(quant):
        raise InvalidRequest(f"{name!r}: the quantization {quant!r} is not a name (letters, digits, . _ -)")
    file = None
    if len(parts) > 2:
        file = "/".join(parts[2:])
        if not file.endswith(".gguf") or not all(PART.match(p) for p in parts[2:]):
            raise InvalidRequest(
                f"{name!r}: a file in a hub name must be a .gguf path ({short}ORG/REPO/FILE.gguf); a "
                f"safetensors model is the whole repo, {short}ORG/REPO"
            )
    return HubRef(hub, f"{parts[0]}/{parts[1]}", file, quant, DEFAULT_REVISION[hub])
