"""The RapidOCR engine on CPU, through its public methods, with the PP-OCRv4 models that ship inside
the rapidocr_onnxruntime package, on images rendered here with Pillow."""

from __future__ import annotations

import asyncio
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source
from shoal.engines.base import EngineConfig
from shoal.errors import InvalidRequest

pytest.importorskip("rapidocr_onnxruntime")

from shoal.engines.rapidocr import RapidOcrEngine  # noqa: E402

SOURCE = Source(python_package="rapidocr_onnxruntime", pattern="models")
LINES = ("SHOAL OCR TEST", "Hello 2026")
FONT_SIZE = 40


def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    candidates = [
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        Path("/usr/share/fonts/TTF/DejaVuSans.ttf"),
        Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
    ]
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        mpl = Path(next(iter(spec.submodule_search_locations)))
        candidates.append(mpl / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    for path in candidates:
        if path.exists():
            return ImageFont.truetype(str(path), FONT_SIZE)
    return ImageFont.load_default(size=FONT_SIZE)  # Pillow's bundled scalable font (needs FreeType)


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def text_image() -> Image.Image:
    image = Image.new("RGB", (640, 200), "white")
    draw = ImageDraw.Draw(image)
    draw.text((30, 30), LINES[0], fill="black", font=font())
    draw.text((30, 110), LINES[1], fill="black", font=font())
    return image


def make_engine(path: Path | None = None, **options: Any) -> RapidOcrEngine:
    model_path = path or local_path(SOURCE)
    assert model_path is not None
    engine = RapidOcrEngine(
        EngineConfig(
            model_path=model_path,
            model_uid="ocr",
            model_format="rapidocr",
            context_length=None,
            n_threads=2,
            options=options,
        )
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine() -> Iterator[RapidOcrEngine]:
    engine = make_engine()
    yield engine
    engine.close()


def squash(text: str) -> str:
    """RapidOCR sometimes drops or adds the space between words; compare without spaces."""
    return text.replace(" ", "").upper()


def check_lines(result: dict[str, Any], size: tuple[int, int]) -> None:
    lines = result["lines"]
    assert [squash(line["text"]) for line in lines] == [squash(x) for x in LINES], result
    assert result["text"] == "\n".join(line["text"] for line in lines)
    for line in lines:
        assert 0.5 <= line["score"] <= 1.0
        assert len(line["box"]) == 4
        for x, y in line["box"]:
            assert 0 <= x <= size[0] and 0 <= y <= size[1]
    top = [min(y for _, y in line["box"]) for line in lines]
    assert top[0] < top[1]  # read top to bottom


def test_png(engine: RapidOcrEngine, text_image: Image.Image) -> None:
    result = asyncio.run(engine.ocr(encode(text_image, "PNG"), {}))
    check_lines(result, text_image.size)


def test_jpeg(engine: RapidOcrEngine, text_image: Image.Image) -> None:
    result = asyncio.run(engine.ocr(encode(text_image, "JPEG", quality=85), {}))
    check_lines(result, text_image.size)


def test_transparent_png(engine: RapidOcrEngine) -> None:
    """Black text on a transparent background is read as on white, not as black on black."""
    image = Image.new("RGBA", (640, 200), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((30, 30), LINES[0], fill=(0, 0, 0, 255), font=font())
    result = asyncio.run(engine.ocr(encode(image, "PNG"), {}))
    assert squash(result["text"]) == squash(LINES[0])


def test_blank_image(engine: RapidOcrEngine) -> None:
    blank = encode(Image.new("RGB", (400, 300), "white"), "PNG")
    assert asyncio.run(engine.ocr(blank, {})) == {"text": "", "lines": []}


@pytest.mark.parametrize("size", [(1, 1), (5000, 1)])
def test_degenerate_shapes(engine: RapidOcrEngine, size: tuple[int, int]) -> None:
    """A single pixel, and a strip RapidOCR alone fails to resize: no text, no error."""
    image = encode(Image.new("L", size, 255), "PNG")
    assert asyncio.run(engine.ocr(image, {})) == {"text": "", "lines": []}


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff\xe0" + b"\x00" * 64],
    ids=["empty", "garbage", "png-magic-only", "jpeg-magic-only"],
)
def test_undecodable(engine: RapidOcrEngine, data: bytes) -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(engine.ocr(data, {}))


def test_truncated(engine: RapidOcrEngine, text_image: Image.Image) -> None:
    for fmt in ("PNG", "JPEG"):
        data = encode(text_image, fmt)
        with pytest.raises(InvalidRequest):
            asyncio.run(engine.ocr(data[: len(data) // 3], {}))


def test_too_many_pixels(engine: RapidOcrEngine) -> None:
    huge = encode(Image.new("1", (8000, 6000), 1), "PNG")  # 48 megapixels, a few kilobytes
    with pytest.raises(InvalidRequest, match="megapixels"):
        asyncio.run(engine.ocr(huge, {}))


@pytest.mark.parametrize(
    "kwargs",
    [{"text_score": 2}, {"text_score": "high"}, {"box_thresh": -1}, {"unclip_ratio": 50}, {"use_cls": "yes"}],
)
def test_bad_kwargs(engine: RapidOcrEngine, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        asyncio.run(engine.ocr(b"never decoded", kwargs))


def test_kwargs_override_launch_settings(engine: RapidOcrEngine, text_image: Image.Image) -> None:
    """A request's text_score filters its lines; the next request is back at the launch's."""
    png = encode(text_image, "PNG")
    strict = asyncio.run(engine.ocr(png, {"text_score": 0.9999, "use_cls": False, "unrelated": 1}))
    assert strict == {"text": "", "lines": []}
    check_lines(asyncio.run(engine.ocr(png, {})), text_image.size)


def test_package_folder_and_options(text_image: Image.Image) -> None:
    """The package folder works as well as its models folder; text_score filters lines."""
    models = local_path(SOURCE)
    assert models is not None and models.name == "models"
    strict = make_engine(models.parent, text_score=0.9999, use_cls=False)
    try:
        assert asyncio.run(strict.ocr(encode(text_image, "PNG"), {})) == {"text": "", "lines": []}
    finally:
        strict.close()
    with pytest.raises(ValueError, match="unknown option"):
        make_engine(text_scor=0.5)
    with pytest.raises(ValueError, match="text_score"):
        make_engine(text_score=5)
