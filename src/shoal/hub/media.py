"""Which files of a hub repo an audio or image engine loads, picked as the engine's own loader picks
them, so a launch downloads those and no more. Pure: the repo's file list in, files out.

- CTranslate2 (faster-whisper): faster-whisper's own download list (`faster_whisper.utils.
  download_model`): config.json, preprocessor_config.json, model.bin, tokenizer.json, vocabulary.*.
- diffusers: model_index.json, and for each component it names (not null) that component's folder:
  its configs, tokenizer and scheduler files, and the weights `DiffusionPipeline.from_pretrained`
  loads with no variant (diffusers' `variant_compatible_siblings`): safetensors when there are
  any, else .bin, plain or sharded with their index, never a precision variant (`*.fp16.*`), an
  ONNX or Flax export, or a single-file checkpoint at the top of the repo. With a launch's
  `variant` (fp16), each component's weights of that variant instead (`model.fp16.safetensors`,
  `model.fp16-00001-of-00002.safetensors` with `model.safetensors.index.fp16.json`, or the legacy
  `model-00001-of-00002.fp16.safetensors`), and the plain ones of a component that has none, as
  diffusers falls back to them; a repo with no file of the variant at all is refused.
- Piper: the voice's .onnx and its .onnx.json; other formats: the file named, else the whole repo.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from shoal.errors import InvalidRequest

if TYPE_CHECKING:  # remote.py imports this module
    from shoal.hub.remote import RemoteFile, RemoteRepo

MEDIA_FORMATS = ("ctranslate2", "diffusers", "piper", "hibari", "rapidocr")
MEDIA_TYPES = {"ctranslate2": "audio", "diffusers": "image"}  # what a hub name of each launches
MODEL_INDEX = "model_index.json"
_CT2 = ("config.json", "preprocessor_config.json", "model.bin", "tokenizer.json")
_VOCABULARY = re.compile(r"^vocabulary\.[^/]+$")
# diffusers' weight names with no variant: diffusion_pytorch_model / model / pytorch_model, maybe
# sharded (-00001-of-00002), and their shard index (X.safetensors.index.json).
_WEIGHTS = re.compile(
    r"^(diffusion_pytorch_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$"
    r"|^(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)\.index\.json$"
)
# Weights of any framework, variant or export: left out unless _WEIGHTS picks them.
_ANY_WEIGHTS = re.compile(
    r"\.(safetensors|bin|msgpack|onnx|onnx_data|pb|ckpt|pt|pth|h5|gguf)$|\.index\.[^/]*json$"
)
_PREFIXES = "diffusion_pytorch_model|model|pytorch_model"


def _variant_weights(variant: str) -> re.Pattern[str]:
    """diffusers' names for a variant's weights and shard index (current and legacy spellings)."""
    v, shard = re.escape(variant), r"\d{5}-of-\d{5}"
    return re.compile(
        rf"^({_PREFIXES})\.{v}(-{shard})?\.(safetensors|bin)$"
        rf"|^({_PREFIXES})\.(safetensors|bin)\.index\.{v}\.json$"
        rf"|^({_PREFIXES})-{shard}\.{v}\.(safetensors|bin)$"
        rf"|^({_PREFIXES})\.(safetensors|bin)\.{v}\.index\.json$"
    )


_TOP_CONFIGS = (MODEL_INDEX, "scheduler_config.json", "config.json")  # diffusers' allow list at the top


def detect(remote: RemoteRepo) -> str | None:
    """The media format a repo's files say: "diffusers" (model_index.json), "ctranslate2"
    (model.bin beside a vocabulary file), else None."""
    names = {f.path for f in remote.files}
    if MODEL_INDEX in names:
        return "diffusers"
    if "model.bin" in names and any(_VOCABULARY.match(n) for n in names):
        return "ctranslate2"
    return None


def select_files(
    remote: RemoteRepo,
    model_format: str,
    file: str | None,
    index: dict[str, Any] | None,
    variant: str | None = None,
) -> tuple[tuple[RemoteFile, ...], str]:
    """(the files, the path the engine loads: a file, or "" for the folder). `variant`: a diffusers
    launch's (fp16), else None."""
    if model_format == "ctranslate2":
        return _ctranslate2(remote), ""
    if model_format == "diffusers":
        return _diffusers(remote, index, variant), ""
    if file is not None:
        chosen = remote.get(file)
        if chosen is None:
            raise InvalidRequest(f"hub repo {remote.repo!r} has no file {file!r}")
        files = [chosen]
        if model_format == "piper":  # the voice's config beside it (x.onnx.json, or x.json)
            config = remote.get(file + ".json") or remote.get(file.removesuffix(".onnx") + ".json")
            if config is None:
                raise InvalidRequest(
                    f"hub repo {remote.repo!r} has no voice config {file}.json beside {file}"
                )
            files.append(config)
        return tuple(files), file
    return tuple(f for f in remote.files if not f.path.startswith(".git")), ""


def _ctranslate2(remote: RemoteRepo) -> tuple[RemoteFile, ...]:
    files = tuple(f for f in remote.files if f.path in _CT2 or _VOCABULARY.match(f.path))
    if not any(f.path == "model.bin" for f in files):
        raise InvalidRequest(
            f"hub repo {remote.repo!r} is not a CTranslate2 model (no model.bin at its top); "
            "faster-whisper loads a CTranslate2 conversion of Whisper"
        )
    return files


def _diffusers(
    remote: RemoteRepo, index: dict[str, Any] | None, variant: str | None = None
) -> tuple[RemoteFile, ...]:
    if remote.get(MODEL_INDEX) is None or index is None:
        raise InvalidRequest(f"hub repo {remote.repo!r} is not a diffusers pipeline (no {MODEL_INDEX})")
    components = {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    by_folder: dict[str, list[RemoteFile]] = {}
    for f in remote.files:
        folder, _, rest = f.path.partition("/")
        if rest and "/" not in rest and folder in components:
            by_folder.setdefault(folder, []).append(f)
    chosen = [f for f in remote.files if f.path in _TOP_CONFIGS]
    of_variant = _variant_weights(variant) if variant else None
    any_variant = False
    for folder, files in sorted(by_folder.items()):
        names = {f.path.split("/")[1] for f in files}
        plain = {n for n in names if _WEIGHTS.match(n)}
        if of_variant is not None and (variants := {n for n in names if of_variant.match(n)}):
            plain, any_variant = variants, True  # else its plain weights, as diffusers falls back
        # safetensors when the folder has them, else the pickled .bin (diffusers' preference)
        kind = ".safetensors" if any(".safetensors" in n for n in plain) else ".bin"
        weights = {n for n in plain if kind in n}
        if not weights and any(_ANY_WEIGHTS.search(n) for n in names):
            raise InvalidRequest(
                f"hub repo {remote.repo!r}: the component {folder!r} has no weights diffusers loads by "
                f"default (only {', '.join(sorted(n for n in names if _ANY_WEIGHTS.search(n)))}); "
                'a launch with "variant" (e.g. fp16) loads a precision variant'
            )
        chosen += [f for f in files if f.path.split("/")[1] in weights or not _ANY_WEIGHTS.search(f.path)]
    if variant and not any_variant:  # diffusers refuses it too ("no such modeling files")
        raise InvalidRequest(
            f"hub repo {remote.repo!r} has no weights of variant {variant!r} in any component "
            f"({', '.join(sorted(by_folder))}); launch it without variant, or with one it has"
        )
    return tuple(chosen)
