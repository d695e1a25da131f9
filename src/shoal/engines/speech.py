"""Helpers the text-to-speech engines share (Piper, Hibari): the speech body's checks, OpenAI's voice
names mapped to a model's own voices, and the worker-thread pipeline that streams speech sentence by
sentence.

OpenAI's voice names (alloy, ash, ...) are accepted by every TTS model, as servers that speak this API
do. `pick_voice` decides which of the model's own voices speaks:
1. a voice the model has under that name is used as it is (Hibari has its own "fable");
2. an OpenAI name goes through the engine's table (`OPENAI_VOICE_PREFERENCES` of the engine): the
   first voice listed there that the model has;
3. else the model's voices in turn: the i-th OpenAI name (in `OPENAI_VOICES` order) speaks with the
   model's voice i mod n, so a one-voice model (the Piper demo voice) says everything in that voice
   and a multi-speaker Piper voice gives each OpenAI name its own speaker.
docs/api-compat.md has the table for the built-in models.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from shoal.errors import InvalidRequest

MAX_INPUT_CHARS = 4096
# Control characters other than tab and newlines: nothing to say, and espeak-ng's phonemizer fails on
# a NUL ("embedded null character"). Each becomes a space.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# The OpenAI SDK's voice names (audio.speech.create), in the order of OpenAI's documentation.
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
)


def pick_voice(asked: str, voice_ids: Sequence[str], preferences: Mapping[str, Sequence[str]]) -> str:
    """The model's voice that speaks for `asked` (rules 1-3 of the module docstring), or InvalidRequest."""
    if asked in voice_ids:
        return asked
    if asked not in OPENAI_VOICES:
        raise InvalidRequest(
            f"unknown voice {asked!r} for this model; its voices: {', '.join(voice_ids)} "
            f"(OpenAI's names are accepted too: {', '.join(OPENAI_VOICES)})"
        )
    preferred = next((v for v in preferences.get(asked, ()) if v in voice_ids), None)
    return preferred or voice_ids[OPENAI_VOICES.index(asked) % len(voice_ids)]


def speech_params(
    body: dict[str, Any], voice_ids: list[str], preferences: Mapping[str, Sequence[str]] | None = None
) -> tuple[str, str, float]:
    """(input, voice, speed) from an OpenAI speech body, or InvalidRequest. No voice: the first one;
    an OpenAI voice name: the model's voice `pick_voice` maps it to."""
    text = body.get("input")
    if isinstance(text, str):
        text = CONTROL_CHARS.sub(" ", text)
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("input must be a non-empty string (control characters do not count)")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidRequest(f"input is {len(text)} characters; the maximum is {MAX_INPUT_CHARS}")
    voice = body.get("voice")
    if voice is None or voice == "":
        voice = voice_ids[0]
    if not isinstance(voice, str):
        raise InvalidRequest(f"voice must be a string, not {voice!r}")
    voice = pick_voice(voice, voice_ids, preferences or {})
    speed = body.get("speed")
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequest(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED}, not {speed!r}")
    return text, voice, float(speed)


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class StreamStats:
    """Counters an engine shares with its worker threads (read by tests and metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sentences_synthesized = 0  # chunks produced, over all requests
        self.active_streams = 0  # worker threads running now

    def add(self, sentences: int = 0, streams: int = 0) -> None:
        with self._lock:
            self.sentences_synthesized += sentences
            self.active_streams += streams


async def stream_from_thread(
    produce: Callable[[], Iterator[bytes]], stats: StreamStats, read_ahead: int = 2
) -> AsyncIterator[bytes]:
    """Run the blocking iterator produce() in a worker thread, yielding each chunk as soon as it exists.

    The thread starts at the first iteration; each next() on produce()'s iterator is one sentence.
    The worker runs at most read_ahead chunks ahead of the consumer (a slow client holds back
    synthesis instead of piling up audio). When this generator is closed or cancelled, the thread
    stops before the next sentence (the one in progress finishes: onnxruntime cannot be interrupted)
    and is not waited for: after the consumer took n chunks, at most n + read_ahead were made."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | _End | _Failed] = asyncio.Queue()
    stop = threading.Event()
    permits = threading.Semaphore(read_ahead)  # one per chunk made and not yet taken by the consumer

    def put(item: bytes | _End | _Failed) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening
            stop.set()

    def work() -> None:
        ending: _End | _Failed = _End()
        try:
            chunks = produce()
            try:
                while True:
                    permits.acquire()
                    if stop.is_set():
                        break
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        break
                    stats.add(sentences=1)
                    if not chunk:
                        permits.release()  # nothing for the consumer to take
                    elif not stop.is_set():
                        put(chunk)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            ending = _Failed(exc)
        finally:
            stats.add(streams=-1)  # before the consumer hears of the end: its stats are then final
            put(ending)

    stats.add(streams=1)
    thread = threading.Thread(target=work, name="speech-synthesis", daemon=True)
    try:
        thread.start()
    except BaseException:
        stats.add(streams=-1)
        raise
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.exc
            permits.release()
            yield item
    finally:
        stop.set()
        permits.release()  # wakes a worker waiting for a permit, to see stop and end


def float_to_pcm16(audio: Any) -> bytes:
    """float audio in [-1, 1] → int16 little-endian bytes (clipped)."""
    import numpy as np

    return bytes((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
