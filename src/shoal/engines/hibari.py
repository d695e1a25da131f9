"""Hibari text-to-speech (hibari-tts: small voices distilled from Kokoro-82M, 24 kHz, onnxruntime
plus a numpy vocoder on the host; its own G2P, no espeak).

Each Hibari voice is a complete 7.9 MB model. model_path names one voice file (the package's bundled
assets/hibari.onnx is the voice "heart") or a folder: every known voice file in it (or in its assets/)
becomes one of the model's voices, e.g. a HIBARI_HOME cache holding downloaded voices. A file the
voice registry does not know needs the launch option voice=<registry name> (for its G2P and language).

Speech streams sentence by sentence through the worker-thread pipeline of engines/speech.py, as
Piper's does. OpenAI's voice names map to Hibari voices by OPENAI_VOICE_PREFERENCES below.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.engines.base import Engine, SpeechStream
from shoal.engines.speech import StreamStats, float_to_pcm16, speech_params, stream_from_thread

# OpenAI's voice names → Hibari voices, best first, by the voices' usual character (male or female,
# American or British); the first one the model has speaks. Only "heart" ships in the package, so the
# demo model says every name in it (pick_voice's rule 3). Hibari's own "fable" answers "fable".
OPENAI_VOICE_PREFERENCES: dict[str, tuple[str, ...]] = {
    "alloy": ("heart",),
    "ash": ("fenrir", "fable"),
    "ballad": ("fable", "fenrir"),
    "coral": ("kore", "heart"),
    "echo": ("fenrir", "fable"),
    "fable": ("fable", "fenrir"),
    "onyx": ("fenrir", "fable"),
    "nova": ("heart", "kore"),
    "sage": ("emma", "kore"),
    "shimmer": ("kore", "heart"),
    "verse": ("fable", "fenrir"),
}


class HibariEngine(Engine):
    name = "hibari"

    def load(self) -> None:
        import onnxruntime
        from hibari import SAMPLE_RATE, Hibari
        from hibari.voices import VOICES

        opts = self.pop_options()
        files = self._voice_files(Path(self.config.model_path), VOICES, opts.get("voice"))
        threads = self.config.n_threads or 1  # hibari's default: ~100x realtime on one core
        g2ps: dict[bool, Any] = {}
        self._tts: dict[str, Any] = {}
        self._voices: list[dict[str, Any]] = []
        for name, path in files.items():
            entry = VOICES[name]
            tts = Hibari(voice=name, model=str(path), threads=threads, g2p=g2ps.get(entry["british"]))
            g2ps[entry["british"]] = tts.g2p  # loads the G2P now (~0.5 s), shared by voices of one accent
            if self.config.device == "cuda":
                tts.sess = self._cuda_session(onnxruntime, str(path), threads)
            self._tts[name] = tts
            described = entry.get("accent") and entry.get("gender")
            title = f"{name} ({entry['accent']} English, {entry['gender']})" if described else name
            self._voices.append({"id": name, "name": title, "language": entry.get("language")})
        self.sample_rate = int(SAMPLE_RATE)
        self._seed = opts.get("seed")
        self._lock = threading.Lock()  # one sentence at a time (the G2P is plain Python state)
        self.stats = StreamStats()

    @staticmethod
    def _voice_files(path: Path, registry: dict[str, Any], named: str | None) -> dict[str, Path]:
        """voice name → its ONNX file, for a voice file or a folder of them."""
        if named is not None and named not in registry:
            raise ValueError(f"unknown hibari voice {named!r}; known: {', '.join(registry)}")
        by_file = {v["file"]: name for name, v in registry.items()}
        if path.is_dir():
            folders = [path, path / "assets"]
            found = {
                by_file[p.name]: p
                for folder in folders
                if folder.is_dir()
                for p in sorted(folder.glob("*.onnx"))
                if p.name in by_file and (named is None or by_file[p.name] == named)
            }
            if not found:
                raise ValueError(
                    f"no hibari voice file in {path}; voice files are named: {', '.join(sorted(by_file))}"
                )
            return dict(sorted(found.items(), key=lambda kv: list(registry).index(kv[0])))
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        name = named or by_file.get(path.name)
        if name is None:
            raise ValueError(
                f"{path.name} is not a known hibari voice file; name its voice with the option voice="
                f"({', '.join(registry)})"
            )
        return {name: path}

    @staticmethod
    def _cuda_session(onnxruntime: Any, path: str, threads: int) -> Any:
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeError(
                "device cuda needs onnxruntime with the CUDA execution provider (pip install "
                "onnxruntime-gpu); this onnxruntime has: " + ", ".join(onnxruntime.get_available_providers())
            )
        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = threads
        so.log_severity_level = 3
        return onnxruntime.InferenceSession(
            path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )

    def close(self) -> None:
        self._tts.clear()

    @property
    def sentences_synthesized(self) -> int:
        return self.stats.sentences_synthesized

    def voices(self) -> list[dict[str, Any]]:
        return [dict(v) for v in self._voices]

    async def speech(self, body: dict[str, Any]) -> SpeechStream:
        import numpy as np

        text, voice, speed = speech_params(body, [v["id"] for v in self._voices], OPENAI_VOICE_PREFERENCES)
        tts = self._tts[voice]
        rng = np.random.default_rng(self._seed)

        def produce() -> Iterator[bytes]:
            for sentence in tts.split_sentences(text):
                with self._lock:
                    # a long sentence comes back as several pieces, split at clause punctuation
                    pieces = tts.phonemize(sentence)
                for phonemes in pieces:
                    with self._lock:
                        audio = tts.from_ids(tts.ids(phonemes), speed, rng)
                    yield float_to_pcm16(audio)

        return SpeechStream(self.sample_rate, stream_from_thread(produce, self.stats))
