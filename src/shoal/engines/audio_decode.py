"""Uploaded audio files → float32 mono samples, with PyAV (FFmpeg) from memory: wav, mp3, flac,
ogg/opus, m4a/aac, webm... Anything that does not decode to at least one sample is the client's
fault and answers 400, whatever FFmpeg raised."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from shoal.errors import InvalidRequest

MAX_SECONDS = 2 * 60 * 60  # refused beyond this: 2 h at 16 kHz is 460 MB of float32


def _fail(reason: str) -> InvalidRequest:
    return InvalidRequest(f"could not decode the audio file: {reason}")


def decode_audio(data: bytes, sample_rate: int = 16000, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """The first audio stream of `data`, resampled to `sample_rate` Hz mono float32 in [-1, 1]."""
    if not data:
        raise _fail("the file is empty")
    try:
        return _decode(data, sample_rate, max_seconds)
    except InvalidRequest:
        raise
    except Exception as exc:  # FFmpeg's errors, and anything odd a broken file provokes in PyAV
        # FFmpeg's own words ("Invalid data found when processing input"), without errno and file name
        reason = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
        raise _fail(reason) from exc


def _decode(data: bytes, sample_rate: int, max_seconds: float) -> np.ndarray:
    import av

    limit = int(max_seconds * sample_rate)
    too_long = _fail(f"longer than the limit of {max_seconds / 60:g} minutes")
    chunks: list[np.ndarray] = []
    total = 0
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise _fail("no audio stream in it")
        stream = container.streams.audio[0]
        # refuse early when the container states a length (it may lie; the count below decides)
        if stream.duration is not None and stream.time_base is not None:
            if float(stream.duration * stream.time_base) > max_seconds + 1:
                raise too_long
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)

        def take(frames: list[Any]) -> None:
            nonlocal total
            for frame in frames:
                samples = frame.to_ndarray().reshape(-1)
                total += samples.shape[0]
                if total > limit:
                    raise too_long
                chunks.append(samples)

        try:
            for frame in container.decode(stream):
                take(resampler.resample(frame))
        except av.error.InvalidDataError:
            # a damaged or truncated tail: keep what decoded before it, refuse when nothing did
            if not chunks:
                raise
        take(resampler.resample(None))  # flush what the resampler holds back
    if total == 0:
        raise _fail("no audio samples in it")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise _fail("it decodes to non-finite samples")
    return audio
