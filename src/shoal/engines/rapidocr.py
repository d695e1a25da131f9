"""RapidOCR (PaddleOCR's PP-OCR detection, angle classification and recognition models as ONNX) on
onnxruntime, CPU; CUDA only where onnxruntime-gpu is installed, otherwise it falls back to the CPU.

The model path is the folder that holds the three .onnx files (`*det*.onnx`, `*cls*.onnx`,
`*rec*.onnx`; the recognition model carries its character list) or a folder with such a `models`
folder inside, so the package rapidocr_onnxruntime itself serves as a catalog source. Images are
decoded here with Pillow, not by RapidOCR, so that anything a client sends that is not an image
within the size limit answers 400.
"""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

from shoal.engines.base import Engine
from shoal.errors import InvalidRequest

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 2000  # RapidOCR's max_side_len: longer images are scaled down to it
# Longest side over shortest side past which the image is padded. RapidOCR's detector scales the
# short side up to 736 pixels, so a 40x4000 strip would become a 736x73600 tensor, and a 1x5000 one
# fails its resize outright; up to 10:1 the detector's input stays under 736x7360. Padding costs
# accuracy (less upscaling of small text), so it is kept to the extreme shapes.
MAX_ASPECT = 10
# RapidOCR's own defaults (its config.yaml), restated because its __call__ resets whichever of them
# a call does not pass.
DEFAULT_TEXT_SCORE = 0.5
DEFAULT_BOX_THRESH = 0.5
DEFAULT_UNCLIP_RATIO = 1.6


def _find_model(folder: Path, kind: str) -> Path:
    matches = sorted(folder.glob(f"*{kind}*.onnx"))
    if not matches:
        raise FileNotFoundError(f"no *{kind}*.onnx model in {folder}")
    return matches[0]


def _models_folder(path: Path) -> Path:
    if path.is_dir() and (path / "models").is_dir() and not any(path.glob("*.onnx")):
        return path / "models"
    if not path.is_dir():
        raise FileNotFoundError(f"RapidOCR model path {path} is not a folder")
    return path


def _unit_interval(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a number between 0 and 1") from None
    if not 0.0 <= number <= 1.0:
        raise InvalidRequest(f"{name} must be a number between 0 and 1")
    return number


def settings(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The recognition settings (launch options, or a request's kwargs over the launch's), checked;
    other names in values are ignored."""
    out = dict(defaults)
    for name in ("text_score", "box_thresh"):
        if values.get(name) is not None:
            out[name] = _unit_interval(name, values[name])
    if values.get("unclip_ratio") is not None:
        try:
            out["unclip_ratio"] = float(values["unclip_ratio"])
        except (TypeError, ValueError):
            raise InvalidRequest("unclip_ratio must be a number") from None
        if not 0.5 <= out["unclip_ratio"] <= 5.0:
            raise InvalidRequest("unclip_ratio must be between 0.5 and 5")
    if values.get("use_cls") is not None:
        if not isinstance(values["use_cls"], bool):
            raise InvalidRequest("use_cls must be true or false")
        out["use_cls"] = values["use_cls"]
    return out


def decode_image(data: bytes, max_pixels: int) -> Any:
    """The image as a BGR uint8 array (what RapidOCR takes), transparency flattened onto white.
    Raises InvalidRequest for anything else: not an image, truncated, empty, or too large."""
    import numpy as np
    from PIL import Image, ImageOps

    if not data:
        raise InvalidRequest("the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidRequest(f"the image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                    f"the limit is {max_pixels / 1e6:g}"
                )
            img.load()
            try:
                frame = ImageOps.exif_transpose(img) or img  # phone photos: upright as shown
            except Exception:  # a broken EXIF block is no reason to refuse the pixels
                frame = img
            if frame.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                # 16-bit or float greyscale: stretch to 8 bits rather than clip at 255
                values = np.asarray(frame, dtype=np.float32)
                low, high = float(values.min()), float(values.max())
                scale = 255.0 / (high - low) if high > low else 0.0
                frame = Image.fromarray(((values - low) * scale).astype(np.uint8), mode="L")
            has_alpha = frame.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
                frame.mode == "P" and "transparency" in frame.info
            )
            if has_alpha:
                rgba = frame.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = frame.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8)
    except InvalidRequest:
        raise
    except Exception as exc:  # Pillow raises many kinds (OSError, ValueError, SyntaxError, ...)
        raise InvalidRequest(f"the image could not be decoded: {exc}") from None
    return np.ascontiguousarray(array[:, :, ::-1])


def fit_image(image: Any, max_side: int) -> tuple[Any, float]:
    """Scale the image down to max_side and pad it (on the right or bottom, with the median colour
    of its border) to at most MAX_ASPECT:1. Returns the image and the scale applied; boxes found on
    it map back to the original by dividing by the scale."""
    import cv2
    import numpy as np

    height, width = image.shape[:2]
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        height, width = image.shape[:2]
    short = -(-max(height, width) // MAX_ASPECT)
    if min(height, width) < short:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        colour = [int(c) for c in np.median(border, axis=0)]
        bottom, right = (short - height, 0) if height < width else (0, short - width)
        image = cv2.copyMakeBorder(image, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=colour)
    return image, scale


class RapidOcrEngine(Engine):
    name = "rapidocr"

    def load(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        opts = self.pop_options()
        defaults = {
            "text_score": DEFAULT_TEXT_SCORE,
            "box_thresh": DEFAULT_BOX_THRESH,
            "unclip_ratio": DEFAULT_UNCLIP_RATIO,
            "use_cls": True,
        }
        try:
            self._settings = settings(opts, defaults)
        except InvalidRequest as exc:
            raise ValueError(f"bad option for engine {self.name}: {exc.message}") from None
        self._max_pixels = int(opts.get("max_pixels", DEFAULT_MAX_PIXELS))
        self._max_side = int(opts.get("max_side_len", DEFAULT_MAX_SIDE))
        if self._max_pixels < 1 or self._max_side < 32:
            raise ValueError("max_pixels must be positive and max_side_len at least 32")

        folder = _models_folder(Path(self.config.model_path))
        use_cuda = self.config.device == "cuda"
        kwargs: dict[str, Any] = {
            "det_model_path": str(_find_model(folder, "det")),
            "cls_model_path": str(_find_model(folder, "cls")),
            "rec_model_path": str(_find_model(folder, "rec")),
            "det_use_cuda": use_cuda,
            "cls_use_cuda": use_cuda,
            "rec_use_cuda": use_cuda,
            "text_score": self._settings["text_score"],
            "max_side_len": self._max_side,
        }
        if self.config.n_threads:
            # RapidOCR hands these to each onnxruntime session (ignored above the core count)
            kwargs["intra_op_num_threads"] = int(self.config.n_threads)
            kwargs["inter_op_num_threads"] = 1
        self._ocr = RapidOCR(**kwargs)
        self._lock = threading.Lock()  # RapidOCR keeps per-call thresholds on the instance

    def close(self) -> None:
        del self._ocr

    def _run(self, image: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        height, width = float(image.shape[0]), float(image.shape[1])
        image, scale = fit_image(image, self._max_side)
        with self._lock:
            # all of text_score, box_thresh and unclip_ratio every time: RapidOCR resets the ones
            # a call leaves out to its defaults
            result, _elapsed = self._ocr(image, **params)
        lines: list[dict[str, Any]] = []
        for box, text, score in result or []:
            text = str(text).strip()
            if not text:
                continue
            lines.append(
                {
                    "text": text,
                    "score": round(float(score), 4),
                    "box": [
                        [round(min(float(x) / scale, width), 1), round(min(float(y) / scale, height), 1)]
                        for x, y in box
                    ],
                }
            )
        return lines

    async def warm_up(self) -> str:
        """A small image with a word on it: detection, classification and recognition all run."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (240, 80), "white")
        ImageDraw.Draw(image).text((20, 20), "Shoal 42", fill="black", font_size=32)
        out = io.BytesIO()
        image.save(out, format="PNG")
        await self.ocr(out.getvalue(), {})
        return "ocr"

    async def ocr(self, image: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """body: the request's kwargs; text_score, box_thresh, unclip_ratio and use_cls override the
        launch's settings for this image, other names are ignored."""
        params = settings(body, self._settings)
        array = await asyncio.to_thread(decode_image, image, self._max_pixels)
        lines = await asyncio.to_thread(self._run, array, params)
        return {"text": "\n".join(line["text"] for line in lines), "lines": lines}
