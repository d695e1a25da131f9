"""An engine's verbose transcription → the response_format a client asked for (json, text, srt,
vtt, verbose_json), as OpenAI's /v1/audio/transcriptions answers them."""

from __future__ import annotations

from typing import Any

import orjson

from shoal.errors import InvalidRequest

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def render(result: dict[str, Any], response_format: str) -> tuple[bytes, str]:
    """(body, media type) for `response_format`; an unknown format is the client's error."""
    if response_format == "json":
        return orjson.dumps({"text": result.get("text", "")}), JSON
    if response_format == "verbose_json":
        return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY), JSON
    if response_format == "text":
        return (result.get("text", "") + "\n").encode(), TEXT
    if response_format == "srt":
        return srt(result.get("segments") or []).encode(), TEXT
    if response_format == "vtt":
        return vtt(result.get("segments") or []).encode(), "text/vtt; charset=utf-8"
    raise InvalidRequest(f"unknown response_format {response_format!r}; known: {', '.join(FORMATS)}")


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS{decimal}mmm, rounded to the millisecond (SRT takes ",", WebVTT ".")."""
    ms = max(0, round(float(seconds) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cues(segments: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    cues = []
    for seg in segments:
        # a blank line would end the cue early, and "-->" is not allowed inside WebVTT cue text
        text = " ".join(str(seg.get("text", "")).split()).replace("-->", "->")
        if text:
            start = float(seg.get("start", 0.0))
            cues.append((start, max(start, float(seg.get("end", start))), text))
    return cues


def srt(segments: list[dict[str, Any]]) -> str:
    return "".join(
        f"{i}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n"
        for i, (start, end, text) in enumerate(_cues(segments), start=1)
    )


def vtt(segments: list[dict[str, Any]]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n\n"
        for start, end, text in _cues(segments)
    )
