"""faster-whisper (CTranslate2) for Whisper speech-to-text models, CPU or CUDA.

Batching across requests: each request runs faster-whisper's own transcription (its 30-s windows,
prompts, temperature fallback, word timestamps) on a thread of its own, and the CTranslate2 model
under it is `_SharedModel`, which runs every model call of every request on one model thread: the
decoder calls (`generate`, beam search) of concurrent requests as one batch through engines/batching.py,
the encoder and the rest one call at a time. Only the decoder gains from a batch on a 2-core CPU (the
encoder's batch is slower there: docs/benchmarks.md), and a batch of decoder calls gives each request
the tokens and scores it gets alone: every encoder window is padded to 30 s already, and calls are
batched only with calls of the same prompt length and the same decoding settings, so nothing is padded.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shoal.engines.audio_decode import decode_audio
from shoal.engines.base import Engine
from shoal.engines.batching import Batcher, BatchSettings
from shoal.errors import InvalidRequest

T = TypeVar("T")

SAMPLE_RATE = 16000  # what every Whisper model takes

# Whisper's language codes and the names OpenAI's verbose_json reports ("language": "english").
_LANGUAGE_TABLE = """
en=english zh=chinese de=german es=spanish ru=russian ko=korean fr=french ja=japanese pt=portuguese
tr=turkish pl=polish ca=catalan nl=dutch ar=arabic sv=swedish it=italian id=indonesian hi=hindi
fi=finnish vi=vietnamese he=hebrew uk=ukrainian el=greek ms=malay cs=czech ro=romanian da=danish
hu=hungarian ta=tamil no=norwegian th=thai ur=urdu hr=croatian bg=bulgarian lt=lithuanian la=latin
mi=maori ml=malayalam cy=welsh sk=slovak te=telugu fa=persian lv=latvian bn=bengali sr=serbian
az=azerbaijani sl=slovenian kn=kannada et=estonian mk=macedonian br=breton eu=basque is=icelandic
hy=armenian ne=nepali mn=mongolian bs=bosnian kk=kazakh sq=albanian sw=swahili gl=galician
mr=marathi pa=punjabi si=sinhala km=khmer sn=shona yo=yoruba so=somali af=afrikaans oc=occitan
ka=georgian be=belarusian tg=tajik sd=sindhi gu=gujarati am=amharic yi=yiddish lo=lao uz=uzbek
fo=faroese ht=haitian_creole ps=pashto tk=turkmen nn=nynorsk mt=maltese sa=sanskrit
lb=luxembourgish my=myanmar bo=tibetan tl=tagalog mg=malagasy as=assamese tt=tatar haw=hawaiian
ln=lingala ha=hausa ba=bashkir jw=javanese su=sundanese yue=cantonese
"""
LANGUAGES: dict[str, str] = {
    code: name.replace("_", " ") for code, name in (item.split("=") for item in _LANGUAGE_TABLE.split())
}
LANGUAGE_CODES: dict[str, str] = {name: code for code, name in LANGUAGES.items()}

# OpenAI's temperature 0 means "start greedy, fall back to sampling": Whisper's own schedule.
TEMPERATURE_STEP = 0.2
# Decoder calls per batch unless the launch says: 1.4x the throughput of one at a time at 8 on the
# 2-core CPU (docs/benchmarks.md); each is beam_size sequences with a cache of up to 448 tokens.
DEFAULT_MAX_BATCH = 8


class _Abandoned(Exception):
    """The request's client left: its transcription stops at its next model call."""


@dataclass(eq=False)
class _Request:
    """What a request's thread needs to reach the batcher, and what stops it."""

    loop: asyncio.AbstractEventLoop
    stop: threading.Event = field(default_factory=threading.Event)
    pending: concurrent.futures.Future[Any] | None = None  # the model call it waits for

    def abandon(self) -> None:
        self.stop.set()
        if self.pending is not None:
            self.pending.cancel()  # a decode still queued leaves the queue


@dataclass(frozen=True, eq=False)
class _Decode:
    """One request's decoder call: its window's encoder output, its prompt and faster-whisper's
    settings for it (beam or sampling, thresholds), `key` naming the calls it may share a batch with."""

    encoder_output: Any  # a ctranslate2.StorageView of one window, in host memory
    prompt: list[int]
    kwargs: dict[str, Any]
    key: str


class _SharedModel:
    """Stands in for WhisperModel.model (the ctranslate2.models.Whisper) under faster-whisper: the
    calls of all request threads run on the batcher's one model thread."""

    def __init__(self, model: Any, settings: BatchSettings) -> None:
        self._model = model
        self.batcher: Batcher[_Decode, Any] = Batcher(self._generate_batch, settings)
        self._local = threading.local()  # the _Request this thread runs

    def __getattr__(self, name: str) -> Any:  # is_multilingual, n_mels, device, device_index...
        return getattr(self._model, name)

    def run_request(self, request: _Request, fn: Any, *args: Any) -> Any:
        """fn(*args) on this thread (one of the engine's request threads) for this request."""
        if request.stop.is_set():
            raise _Abandoned
        self._local.request = request
        try:
            return fn(*args)
        finally:
            del self._local.request

    def _wait(self, call: Coroutine[Any, Any, T]) -> T:
        request: _Request = self._local.request
        if request.stop.is_set():
            call.close()
            raise _Abandoned
        future = asyncio.run_coroutine_threadsafe(call, request.loop)
        request.pending = future
        if request.stop.is_set():  # abandoned between the check and the assignment
            future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _Abandoned from None
        finally:
            request.pending = None

    def _alone(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._wait(self.batcher.call(lambda: fn(*args, **kwargs)))

    def encode(self, features: Any, to_cpu: bool = False) -> Any:
        # in host memory, where a batch's encoder outputs are joined (generate takes them from there)
        return self._alone(self._model.encode, features, to_cpu=True)

    def detect_language(self, *args: Any, **kwargs: Any) -> Any:
        return self._alone(self._model.detect_language, *args, **kwargs)

    def align(self, *args: Any, **kwargs: Any) -> Any:
        return self._alone(self._model.align, *args, **kwargs)

    def generate(self, encoder_output: Any, prompts: list[list[int]], **kwargs: Any) -> Any:
        if len(prompts) != 1:  # not what faster-whisper's own loop asks: run it as it is
            return self._alone(self._model.generate, encoder_output, prompts, **kwargs)
        decode = _Decode(encoder_output, list(prompts[0]), kwargs, repr(sorted(kwargs.items())))
        return self._wait(self.batcher.submit([decode], [len(decode.prompt)]))

    def _generate_batch(self, decodes: list[_Decode]) -> list[Any]:
        """One generate call per group of decodes with the same settings and prompt length."""
        import ctranslate2
        import numpy as np

        groups: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        for i, decode in enumerate(decodes):
            groups[(decode.key, len(decode.prompt))].append(i)
        results: list[Any] = [None] * len(decodes)
        for indices in groups.values():
            first = decodes[indices[0]]
            if len(indices) == 1:
                output = first.encoder_output
            else:
                joined = np.concatenate([np.asarray(decodes[i].encoder_output) for i in indices])
                output = ctranslate2.StorageView.from_array(joined)
            answers = self._model.generate(output, [decodes[i].prompt for i in indices], **first.kwargs)
            for i, answer in zip(indices, answers, strict=True):
                results[i] = answer
        return results


class FasterWhisperEngine(Engine):
    name = "faster_whisper"

    def load(self) -> None:
        from faster_whisper import WhisperModel

        opts = self.pop_options()
        on_cuda = self.config.device == "cuda"
        compute_type = str(opts.get("compute_type") or ("float16" if on_cuda else "int8"))
        self._beam_size = int(opts.get("beam_size", 5))
        if self._beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, not {self._beam_size}")
        self._model = WhisperModel(
            str(self.config.model_path),
            device="cuda" if on_cuda else "cpu",
            compute_type=compute_type,
            cpu_threads=self.config.n_threads or 0,
        )
        self.multilingual = bool(self._model.model.is_multilingual)
        settings = BatchSettings.from_options(opts, DEFAULT_MAX_BATCH)
        self._shared = _SharedModel(self._model.model, settings)
        self._model.model = self._shared
        # one thread per request in flight, up to a batch of them (max_batch_size 1: one at a time)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            settings.max_batch_size, thread_name_prefix="shoal-transcribe"
        )

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._shared.batcher.close()
        del self._model

    def metrics(self) -> dict[str, float]:
        return {**self._shared.batcher.counters, "queued_inputs": self._shared.batcher.queued()}

    def _language(self, raw: Any) -> str | None:
        """The Whisper code for the requested language, refused when this model cannot do it."""
        if raw is None or raw == "":
            return None
        text = str(raw).strip().lower()
        code = text if text in LANGUAGES else LANGUAGE_CODES.get(text)
        if code is None:
            raise InvalidRequest(f"unknown language {raw!r}: give an ISO-639-1 code such as 'en' or 'de'")
        if not self.multilingual and code != "en":
            raise InvalidRequest(
                f"model {self.config.model_uid!r} is English-only: it cannot transcribe "
                f"{LANGUAGES[code]} ({code!r}); use a multilingual Whisper model"
            )
        return code

    def _options(self, body: dict[str, Any]) -> dict[str, Any]:
        task = body.get("task") or "transcribe"
        if task not in ("transcribe", "translate"):
            raise InvalidRequest(f"task must be 'transcribe' or 'translate', not {task!r}")
        if task == "translate" and not self.multilingual:
            raise InvalidRequest(
                f"model {self.config.model_uid!r} is English-only and cannot translate into English; "
                "use a multilingual Whisper model (e.g. tiny, base, small, not *.en) for translations"
            )
        granularities = body.get("timestamp_granularities") or ["segment"]
        if isinstance(granularities, str):
            granularities = [granularities]
        unknown = sorted(set(granularities) - {"segment", "word"})
        if unknown:
            raise InvalidRequest(
                f"timestamp_granularities may hold 'segment' and 'word', not {', '.join(map(repr, unknown))}"
            )
        temperature = body.get("temperature")
        start = 0.0 if temperature is None else float(temperature)
        if not 0.0 <= start <= 1.0:
            raise InvalidRequest(f"temperature must be between 0 and 1, not {temperature}")
        schedule = []
        t = start
        while t <= 1.0 + 1e-6:
            schedule.append(round(t, 2))
            t += TEMPERATURE_STEP
        return {
            "task": task,
            "language": self._language(body.get("language")),
            "initial_prompt": body.get("prompt") or None,
            "temperature": schedule,
            "word_timestamps": "word" in granularities,
            "beam_size": self._beam_size,
        }

    async def warm_up(self) -> str:
        """One second of a quiet tone, transcribed: the encoder and the decoder both run."""
        import io
        import math
        import struct
        import wave

        out = io.BytesIO()
        with wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            tone = (int(3000 * math.sin(2 * math.pi * 440 * i / SAMPLE_RATE)) for i in range(SAMPLE_RATE))
            wav.writeframes(b"".join(struct.pack("<h", s) for s in tone))
        await self.transcribe(out.getvalue(), {"task": "transcribe", "language": "en"})
        return "transcribe"

    async def transcribe(self, audio: bytes, body: dict[str, Any]) -> dict[str, Any]:
        options = self._options(body)  # refuse before spending time on decoding
        samples = await asyncio.to_thread(decode_audio, audio, SAMPLE_RATE)
        loop = asyncio.get_running_loop()
        request = _Request(loop)
        try:
            return await loop.run_in_executor(
                self._threads, self._shared.run_request, request, self._run, samples, options
            )
        finally:
            request.abandon()  # a cancelled caller: its thread stops at its next model call

    def _run(self, samples: Any, options: dict[str, Any]) -> dict[str, Any]:
        words_asked = options["word_timestamps"]
        segments_iter, info = self._model.transcribe(samples, **options)
        segments = list(segments_iter)  # the generator does the work, its model calls through _shared
        out_segments: list[dict[str, Any]] = []
        words: list[dict[str, Any]] = []
        for seg in segments:
            out_segments.append(
                {
                    "id": len(out_segments),  # OpenAI counts from 0
                    "seek": int(seg.seek),
                    "start": float(seg.start),
                    "end": float(seg.end),
                    "text": seg.text,
                    "tokens": [int(t) for t in seg.tokens],
                    "temperature": float(seg.temperature or 0.0),
                    "avg_logprob": float(seg.avg_logprob),
                    "compression_ratio": float(seg.compression_ratio),
                    "no_speech_prob": float(seg.no_speech_prob),
                }
            )
            if words_asked:
                words.extend(
                    {"word": w.word.strip(), "start": float(w.start), "end": float(w.end)}
                    for w in seg.words or []
                )
        result: dict[str, Any] = {
            "task": options["task"],
            "language": LANGUAGES.get(info.language, info.language),
            "duration": float(info.duration),
            "text": "".join(seg.text for seg in segments).strip(),
            "segments": out_segments,
        }
        if words_asked:
            result["words"] = words
        return result
