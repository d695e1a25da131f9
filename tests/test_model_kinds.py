"""Every model kind end to end through the server, with real clients and the demo models:
speech (OpenAI SDK), transcription (OpenAI SDK, of speech the TTS model made), rerank (httpx and
xinference-client), OCR (multipart), completions on a second LLM, and cancellation."""

from __future__ import annotations

import io
import re
import struct
import wave

import av
import pytest

from conftest import CHAT_MODEL, ShoalServer

TTS, STT, RERANK, OCR, BASE_LLM = (
    "piper-en-us-joe",
    "whisper-tiny.en",
    "minilm-rerank",
    "rapidocr",
    "gemma-3-270m",
)
SENTENCE = "The quick brown fox jumps over the lazy dog."


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def duration(audio: bytes) -> float:
    with av.open(io.BytesIO(audio)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


@pytest.fixture(scope="module")
def kinds(server: ShoalServer) -> ShoalServer:
    for name in (TTS, STT, RERANK, OCR):
        server.ensure(name)
    return server


def test_speech_is_real_audio_and_grows_with_input(kinds: ShoalServer, openai_client) -> None:
    short = openai_client.audio.speech.create(model=TTS, voice="joe", input="Hello.", response_format="wav")
    long = openai_client.audio.speech.create(
        model=TTS, voice="joe", input=SENTENCE * 3, response_format="wav"
    )
    for audio in (short.content, long.content):
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
        with wave.open(io.BytesIO(audio)) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getnframes() > 0
            assert struct.unpack("<I", audio[4:8])[0] == len(audio) - 8
    assert duration(long.content) > 2 * duration(short.content)
    for fmt in ("mp3", "flac", "opus", "pcm"):
        audio = openai_client.audio.speech.create(
            model=TTS, voice="joe", input="Hello there.", response_format=fmt
        )
        assert len(audio.content) > 1000
        if fmt != "pcm":
            assert 0.3 < duration(audio.content) < 5


def test_speech_streams_as_it_is_made(kinds: ShoalServer) -> None:
    body = {"model": TTS, "input": " ".join([SENTENCE] * 5), "response_format": "pcm", "stream": True}
    with kinds.http.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("audio/")
        chunks = [c for c in response.iter_bytes() if c]
    assert len(chunks) > 1 and sum(map(len, chunks)) > 22050  # over half a second of 16-bit audio


def test_transcribe_what_the_tts_said(kinds: ShoalServer, openai_client) -> None:
    wav = openai_client.audio.speech.create(
        model=TTS, voice="joe", input=SENTENCE, response_format="wav"
    ).content
    text = openai_client.audio.transcriptions.create(model=STT, file=("speech.wav", wav)).text
    heard, said = words(text), words(SENTENCE)
    assert sum(w in heard for w in said) >= len(said) - 1, text
    mp3 = openai_client.audio.speech.create(
        model=TTS, voice="joe", input=SENTENCE, response_format="mp3"
    ).content
    verbose = openai_client.audio.transcriptions.create(
        model=STT, file=("speech.mp3", mp3), response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert verbose.language == "english" and verbose.duration > 1 and verbose.words and verbose.segments
    srt = openai_client.audio.transcriptions.create(model=STT, file=("a.wav", wav), response_format="srt")
    assert "-->" in srt and re.search(r"\d\d:\d\d:\d\d,\d\d\d", srt)
    vtt = openai_client.audio.transcriptions.create(model=STT, file=("a.wav", wav), response_format="vtt")
    assert vtt.startswith("WEBVTT")


def test_rerank_puts_the_relevant_document_first(kinds: ShoalServer) -> None:
    docs = [
        "Bananas are rich in potassium.",
        "Paris is the capital and largest city of France.",
        "The stock market fell sharply on Monday.",
    ]
    r = kinds.http.post(
        "/v1/rerank",
        json={
            "model": RERANK,
            "query": "What is the capital of France?",
            "documents": docs,
            "return_documents": True,
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["index"] == 1 and results[0]["document"]["text"] == docs[1]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 3
    top = kinds.http.post(
        "/v1/rerank", json={"model": RERANK, "query": "fruit", "documents": docs, "top_n": 1}
    )
    assert [x["index"] for x in top.json()["results"]] == [0]

    from xinference_client import RESTfulClient

    handle = RESTfulClient(kinds.url).get_model(RERANK)
    assert handle.rerank(docs, "What is the capital of France?")["results"][0]["index"] == 1


def test_ocr_reads_text_in_an_image(kinds: ShoalServer) -> None:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (640, 160), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=48)
    except TypeError:  # an old Pillow
        font = ImageFont.load_default()
    draw.text((20, 40), "SHOAL 2026", fill="black", font=font)
    png = io.BytesIO()
    image.save(png, format="PNG")
    r = kinds.http.post("/v1/images/ocr", data={"model": OCR}, files={"image": ("i.png", png.getvalue())})
    assert r.status_code == 200, r.text
    assert "SHOAL" in r.json()["text"].upper() and "2026" in r.json()["text"]


def test_voices_and_catalog_kinds(kinds: ShoalServer) -> None:
    voices = kinds.http.get("/v1/audio/voices", params={"model": TTS}).json()["voices"]
    assert any(v["id"] == "joe" for v in voices)
    audio_models = {m["model_name"] for m in kinds.http.get("/v1/model_registrations/audio").json()}
    assert {TTS, STT, "hibari"} <= audio_models


def test_second_llm_completes(server: ShoalServer, openai_client) -> None:
    server.ensure(BASE_LLM, n_parallel=1, n_ctx=512)
    try:
        answer = openai_client.completions.create(
            model=BASE_LLM, prompt="The capital of France is", max_tokens=8
        )
        assert answer.choices[0].text.strip() and answer.usage.completion_tokens > 0
        r = server.http.post(
            "/v1/chat/completions", json={"model": BASE_LLM, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 400 and "cannot do chat" in r.json()["error"]["message"]
    finally:
        server.http.delete(f"/v1/models/{BASE_LLM}")


def test_a_closed_stream_frees_the_runner(server: ShoalServer) -> None:
    """With one slot, a stream abandoned after a few tokens must stop generating: the next request
    is served, and llama.cpp's own counter shows the abandoned one never ran its 1,000 tokens."""
    assert (
        server.http.post(
            "/v1/models",
            json={"model_name": CHAT_MODEL, "model_uid": "one-slot", "n_parallel": 1, "n_ctx": 2048},
        ).status_code
        == 200
    )
    try:
        body = {
            "model": "one-slot",
            "messages": [{"role": "user", "content": "Count from 1 to 2000."}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        }
        with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
        r = server.http.post(
            "/v1/chat/completions",
            json={"model": "one-slot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200
        predicted = server.http.get("/v1/models/one-slot/engine_metrics").json()["tokens_predicted_total"]
        assert predicted < 100, predicted
    finally:
        server.http.delete("/v1/models/one-slot")


@pytest.mark.parametrize(
    ("path", "kwargs", "words_in_error"),
    [
        ("/v1/rerank", {"json": {"model": RERANK, "query": "q", "documents": []}}, "documents"),
        ("/v1/rerank", {"json": {"model": RERANK, "query": "", "documents": ["a"]}}, "query"),
        ("/v1/rerank", {"json": {"model": RERANK, "query": "q", "documents": ["a"], "top_n": 0}}, "top_n"),
        ("/v1/audio/speech", {"json": {"model": TTS, "input": "", "voice": "joe"}}, "input"),
        ("/v1/audio/speech", {"json": {"model": TTS, "input": "hi", "voice": "nobody"}}, "voice"),
        (
            "/v1/audio/speech",
            {"json": {"model": TTS, "input": "hi", "response_format": "ogg"}},
            "response_format",
        ),
        ("/v1/audio/speech", {"json": {"model": STT, "input": "hi"}}, "cannot do text2audio"),
        (
            "/v1/audio/transcriptions",
            {"data": {"model": STT}, "files": {"file": ("x.wav", b"not audio at all")}},
            "decode",
        ),
        ("/v1/audio/transcriptions", {"data": {"model": STT}, "files": {"file": ("x.wav", b"")}}, "decode"),
        ("/v1/audio/transcriptions", {"data": {"model": STT}}, "file"),
        ("/v1/audio/transcriptions", {"json": {"model": STT}}, "multipart"),
        (
            "/v1/audio/transcriptions",
            {"data": {"model": STT, "response_format": "xml"}, "files": {"file": ("x.wav", b"RIFF")}},
            "response_format",
        ),
        ("/v1/audio/translations", {"data": {"model": STT}, "files": {"file": ("x.wav", b"x")}}, "translat"),
        ("/v1/images/ocr", {"data": {"model": OCR}, "files": {"image": ("x.png", b"garbage")}}, "image"),
        ("/v1/images/ocr", {"files": {"image": ("x.png", b"garbage")}}, "model"),
    ],
)
def test_bad_inputs_per_kind(kinds: ShoalServer, path: str, kwargs: dict, words_in_error: str) -> None:
    r = kinds.http.post(path, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert words_in_error in r.json()["error"]["message"].lower()
