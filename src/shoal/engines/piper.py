"""Piper text-to-speech (VITS voices in ONNX, espeak-ng phonemes; onnxruntime on the CPU or CUDA).

A model is one voice: its .onnx file and the .onnx.json config beside it (model_path names either the
file or a folder holding exactly one voice). Multi-speaker voices list each speaker as a voice.
OpenAI's voice names need no table here (engines/speech.py `pick_voice`): a one-speaker voice says
them all; a multi-speaker voice gives the i-th OpenAI name speaker i mod n.

Speech streams sentence by sentence: a worker thread synthesizes one sentence at a time and hands
its PCM to the event loop as soon as it exists; when the consumer stops (aclose, cancellation, a
client gone), the worker stops before the next sentence (`stream_from_thread` in engines/speech.py,
shared with the Hibari engine).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.engines.base import Engine, SpeechStream
from shoal.engines.speech import StreamStats, speech_params, stream_from_thread


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
