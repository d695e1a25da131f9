"""Piper text-to-speech (VITS voices in ONNX, espeak-ng phonemes; onnxruntime on the CPU or CUDA).

A model is one voice: its .onnx file and the .onnx.json config beside it (model_path names either the
file or a folder holding exactly one voice). Multi-speaker voices list each speaker as a voice.

Speech streams sentence by sentence: a worker thread synthesizes one sentence at a time and hands
its PCM to the event loop as soon as it exists; when the consumer stops (aclose, cancellation, a
client gone), the worker stops before the next sentence. `stream_from_thread` does this for any
engine whose synthesis is a blocking iterator of PCM chunks (the Hibari engine uses it too).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from shoal.engines.base import Engine, SpeechStream
from shoal.errors import InvalidRequest

MAX_INPUT_CHARS = 4096
# Control characters other than tab and newlines: nothing to say, and espeak-ng's phonemizer fails on
# a NUL ("embedded null character"). Each becomes a space.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MIN_SPEED, MAX_SPEED = 0.25, 4.0


# ---- shared by the text-to-speech engines ---------------------------------------------------------


def speech_params(body: dict[str, Any], voice_ids: list[str]) -> tuple[str, str, float]:
    """(input, voice, speed) from an OpenAI speech body, or InvalidRequest. No voice: the first one."""
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
    if voice not in voice_ids:
        raise InvalidRequest(f"unknown voice {voice!r} for this model; its voices: {', '.join(voice_ids)}")
    speed = body.get("speed")
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequest(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED}, not {speed!r}")
    return text, str(voice), float(speed)


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
            put(_Failed(exc))
        finally:
            stats.add(streams=-1)
            put(_End())

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


# ---- Piper ------------------------------------------------------------------------------------------


def find_voice_files(path: Path) -> tuple[Path, Path]:
    """(model.onnx, model.onnx.json) from a voice's .onnx file or its folder."""
    if path.is_dir():
        models = sorted(p for p in path.glob("*.onnx") if p.with_name(p.name + ".json").is_file())
        if len(models) != 1:
            found = ", ".join(p.name for p in models) or "none"
            raise ValueError(
                f"{path} must hold exactly one Piper voice (x.onnx with x.onnx.json); found: {found}"
            )
        path = models[0]
    config = path.with_name(path.name + ".json")
    if not config.is_file():
        alternative = path.with_suffix(".json")  # some voices ship x.json
        if not alternative.is_file():
            raise ValueError(f"no voice config {config.name} beside {path}")
        config = alternative
    return path, config


class PiperEngine(Engine):
    name = "piper"

    def load(self) -> None:
        import onnxruntime
        from piper import PiperConfig, PiperVoice

        opts = self.pop_options()
        model, config_path = find_voice_files(Path(self.config.model_path))
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        session_options = onnxruntime.SessionOptions()
        if self.config.n_threads:
            session_options.intra_op_num_threads = self.config.n_threads
            session_options.inter_op_num_threads = 1
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.config.device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise RuntimeError(
                    "device cuda needs onnxruntime with the CUDA execution provider (pip install "
                    "onnxruntime-gpu); this onnxruntime has: "
                    + ", ".join(onnxruntime.get_available_providers())
                )
            # as PiperVoice.load(use_cuda=True) does
            providers = [
                ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider",
            ]
        # PiperVoice.load builds its session with default options; built here to honour n_threads
        self._voice = PiperVoice(
            config=PiperConfig.from_dict(raw),
            session=onnxruntime.InferenceSession(
                str(model), sess_options=session_options, providers=providers
            ),
        )
        self.sample_rate = int(self._voice.config.sample_rate)
        self._synthesis_options = opts
        self._voices = self._voice_list(raw, model)
        self._speaker_ids = {v["id"]: v.pop("_speaker") for v in self._voices}
        self._lock = threading.Lock()  # one sentence at a time: concurrent requests interleave by sentence
        self.stats = StreamStats()

    @staticmethod
    def _voice_list(raw: dict[str, Any], model: Path) -> list[dict[str, Any]]:
        language = raw.get("language", {}).get("code") or raw.get("espeak", {}).get("voice")
        language = language.replace("_", "-") if isinstance(language, str) else None  # en_US → en-US
        quality = raw.get("audio", {}).get("quality")
        dataset = raw.get("dataset") or model.name.removesuffix(".onnx")
        speakers: dict[str, int] = raw.get("speaker_id_map") or {}
        if int(raw.get("num_speakers", 1)) > 1 and speakers:
            return [
                {"id": name, "name": f"{dataset} {name}", "language": language, "_speaker": sid}
                for name, sid in sorted(speakers.items(), key=lambda kv: kv[1])
            ]
        title = f"{dataset} ({quality})" if quality else str(dataset)
        return [{"id": str(dataset), "name": title, "language": language, "_speaker": None}]

    def close(self) -> None:
        del self._voice

    @property
    def sentences_synthesized(self) -> int:
        return self.stats.sentences_synthesized

    def voices(self) -> list[dict[str, Any]]:
        return [dict(v) for v in self._voices]

    async def speech(self, body: dict[str, Any]) -> SpeechStream:
        from piper import SynthesisConfig

        text, voice, speed = speech_params(body, [v["id"] for v in self._voices])
        opts = self._synthesis_options
        syn_config = SynthesisConfig(
            speaker_id=self._speaker_ids[voice],
            length_scale=self._voice.config.length_scale / speed,  # the voice's own pace at speed 1
            noise_scale=opts.get("noise_scale"),
            noise_w_scale=opts.get("noise_w_scale"),
            normalize_audio=bool(opts.get("normalize_audio", True)),
            volume=float(opts.get("volume", 1.0)),
        )

        def produce() -> Iterator[bytes]:
            chunks = iter(self._voice.synthesize(text, syn_config))  # phonemizes, then one chunk per sentence
            while True:
                with self._lock:
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk.audio_int16_bytes

        return SpeechStream(self.sample_rate, stream_from_thread(produce, self.stats))
