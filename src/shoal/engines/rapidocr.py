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
# Longest side over shortest side past which the image is padded: RapidOCR letterboxes wide images
# to 4:1 itself but not tall ones, and its detector scales the short side up to 736 pixels, so a
# 40x4000 strip would become a 736x73600 tensor (and 1x5000 fails its resize outright).
MAX_ASPECT = 4
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
            frame = ImageOps.exif_transpose(img) or img
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

        opts = self.pop_options(
            "text_score", "box_thresh", "unclip_ratio", "use_cls", "max_pixels", "max_side_len"
        )
        self._text_score = _unit_interval("text_score", opts.get("text_score", DEFAULT_TEXT_SCORE))
        self._box_thresh = _unit_interval("box_thresh", opts.get("box_thresh", DEFAULT_BOX_THRESH))
        self._unclip_ratio = float(opts.get("unclip_ratio", DEFAULT_UNCLIP_RATIO))
        self._use_cls = bool(opts.get("use_cls", True))
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
            "text_score": self._text_score,
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

    def _run(self, image: Any, text_score: float) -> list[dict[str, Any]]:
        height, width = image.shape[:2]
        image, scale = fit_image(image, self._max_side)
        with self._lock:
            result, _elapsed = self._ocr(
                image,
                use_cls=self._use_cls,
                text_score=text_score,
                box_thresh=self._box_thresh,
                unclip_ratio=self._unclip_ratio,
            )
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

    async def ocr(self, image: bytes, body: dict[str, Any]) -> dict[str, Any]:
        text_score = self._text_score
        if body.get("text_score") is not None:
            text_score = _unit_interval("text_score", body["text_score"])
        array = await asyncio.to_thread(decode_image, image, self._max_pixels)
        lines = await asyncio.to_thread(self._run, array, text_score)
        return {"text": "\n".join(line["text"] for line in lines), "lines": lines}
