"""Routes that take files (speech-to-text, OCR) or list voices. Uploads are multipart forms, as the
OpenAI SDK and xinference-client send them; the file goes to the runner as the raw body with the
other fields in a JSON header."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from shoal.errors import InvalidRequest
from shoal.gateway.routes_openai import check_model, render
from shoal.protocol.openai import TranscriptionParams
from shoal.services.proxy import forward

router = APIRouter(prefix="/v1", tags=["media"])
MAX_UPLOAD = 100 * 1024**2  # bytes: OpenAI allows 25 MB per audio file; Shoal is more generous


def _multipart(*fields: tuple[str, str, bool]) -> dict[str, Any]:
    """openapi_extra for a multipart body: (name, description, is_file)."""
    properties = {
        name: {"type": "string", "format": "binary", "description": d}
        if is_file
        else {"type": "string", "description": d}
        for name, d, is_file in fields
    }
    schema = {"type": "object", "properties": properties, "required": [fields[0][0], "model"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def _form(request: Request, file_field: str) -> tuple[bytes, dict[str, Any]]:
    """The uploaded file's bytes and the other fields; a missing or oversized file is a 400."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(
            f"send a multipart/form-data body with a `{file_field}` file and a `model` field"
        )
    try:
        form = await request.form(max_part_size=MAX_UPLOAD)
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        raise InvalidRequest(f"could not read the multipart body: {exc}") from exc
    upload = form.get(file_field)
    if not isinstance(upload, UploadFile):
        raise InvalidRequest(f"the form needs a `{file_field}` file")
    data = await upload.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise InvalidRequest(f"the file is larger than {MAX_UPLOAD // 1024**2} MiB")
    fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    # The OpenAI SDK sends arrays as repeated `name[]` fields.
    grains = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
    if grains:
        fields["timestamp_granularities"] = [g for g in grains if isinstance(g, str)]
    fields.pop("timestamp_granularities[]", None)
    return data, fields


async def _transcription(request: Request, path: str, task: str) -> Response:
    audio, fields = await _form(request, "file")
    try:
        params = TranscriptionParams.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"invalid request: {problems}") from exc
    service = await check_model(request, params.model, "audio2text")
    header = json.dumps({**params.model_dump(exclude={"model"}), "task": task})
    headers = {"content-type": "application/octet-stream", "x-shoal-params": header}
    return render(await forward(service, params.model, path, audio, False, headers=headers))


FILE_FIELDS = (
    ("file", "the audio: wav, mp3, flac, ogg, m4a, webm...", True),
    ("model", "model uid", False),
    ("language", "ISO-639-1 code", False),
    ("prompt", "text to guide the style or continue a previous segment", False),
    ("response_format", "json, text, srt, vtt or verbose_json", False),
    ("temperature", "0 to 1", False),
)


@router.post("/audio/transcriptions", openapi_extra=_multipart(*FILE_FIELDS))
async def transcriptions(request: Request) -> Response:
    return await _transcription(request, "/v1/audio/transcriptions", "transcribe")


@router.post("/audio/translations", openapi_extra=_multipart(*FILE_FIELDS))
async def translations(request: Request) -> Response:
    """Speech in any language to English text (needs a multilingual model)."""
    return await _transcription(request, "/v1/audio/translations", "translate")


@router.get("/audio/voices")
async def voices(request: Request, model: str) -> Response:
    """The voices a text-to-speech model offers."""
    service = await check_model(request, model, "text2audio")
    return render(await forward(service, model, "/v1/audio/voices", b"", False, method="GET"))


@router.post(
    "/images/ocr", openapi_extra=_multipart(("image", "PNG, JPEG, WebP...", True), ("model", "uid", False))
)
async def ocr(request: Request) -> Response:
    """Text in an image (xinference-client's `ocr`)."""
    image, fields = await _form(request, "image")
    model = fields.get("model")
    if not model:
        raise InvalidRequest("the form needs a `model` field")
    service = await check_model(request, model, "ocr")
    extra = fields.get("kwargs")
    try:
        params = json.loads(extra) if extra else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequest("`kwargs` must be a JSON object") from exc
    headers = {"content-type": "application/octet-stream", "x-shoal-params": json.dumps(params)}
    return render(await forward(service, model, "/v1/images/ocr", image, False, headers=headers))
