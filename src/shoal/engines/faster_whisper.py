"""faster-whisper (CTranslate2) for Whisper speech-to-text models, CPU or CUDA."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from shoal.engines.audio_decode import decode_audio
from shoal.engines.base import Engine
from shoal.errors import InvalidRequest

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
        self._lock = threading.Lock()  # one decode at a time: CTranslate2 already uses every thread

    def close(self) -> None:
        del self._model

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
        return await asyncio.to_thread(self._run, samples, options)

    def _run(self, samples: Any, options: dict[str, Any]) -> dict[str, Any]:
        words_asked = options["word_timestamps"]
        with self._lock:
            segments_iter, info = self._model.transcribe(samples, **options)
            segments = list(segments_iter)  # the generator does the work: consume it under the lock
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
