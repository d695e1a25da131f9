"""diffusers for text-to-image models (Stable Diffusion and kin; CPU or CUDA, torch), answering
OpenAI's POST /v1/images/generations with base64 PNGs."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import re
import secrets
import threading
import time
from typing import Any

from shoal.engines.base import Engine
from shoal.engines.torch_park import park_modules, wake_modules
from shoal.errors import InvalidRequest

MAX_PROMPT_CHARS = 4000
MAX_IMAGES = 4
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_STEPS = 100
MAX_GUIDANCE = 50.0
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_DTYPES = ("float16", "bfloat16", "float32")


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key} must be an integer from {low} to {high}, not {value!r}")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{key} must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"{key} is {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    return value


def _size(raw: Any) -> tuple[int | None, int | None]:
    """(width, height); (None, None) lets the pipeline use its model's native size."""
    if raw is None or raw == "auto":
        return None, None
    match = _SIZE.match(raw) if isinstance(raw, str) else None
    sides = (int(match[1]), int(match[2])) if match else None
    if sides is None or not all(MIN_SIDE <= s <= MAX_SIDE and s % SIDE_MULTIPLE == 0 for s in sides):
        raise InvalidRequest(
            f"size must be 'WIDTHxHEIGHT' with each side a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} "
            f"to {MAX_SIDE} (e.g. '512x512'), or 'auto'; not {raw!r}"
        )
    return sides


def _guidance(raw: Any) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= MAX_GUIDANCE:
        raise InvalidRequest(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE:g}, not {raw!r}")
    return float(raw)


class DiffusersEngine(Engine):
    name = "diffusers"
    can_park = True

    def load(self) -> None:
        import torch
        from diffusers import DiffusionPipeline

        opts = self.pop_options()
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        cuda = self.config.device == "cuda"
        self.cap_cuda_memory(opts)  # the scheduler's reservation, before any weight
        dtype_name = str(opts.get("dtype") or ("float16" if cuda else "float32"))
        if dtype_name not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; not {dtype_name!r}")
        # launch defaults for requests that name none; else the pipeline's own (50 steps, 7.5 for SD)
        self._default_steps = self._launch_int(opts, "num_inference_steps", 1, MAX_STEPS)
        self._default_guidance = self._launch_guidance(opts)

        # variant: the weights of that precision (the gateway fetched those: hub/media.py)
        variant = str(opts["variant"]) if opts.get("variant") else None
        pipe: Any = DiffusionPipeline.from_pretrained(
            str(self.config.model_path),
            dtype=getattr(torch, dtype_name),
            variant=variant,
            local_files_only=True,
        )
        self._accepts = set(inspect.signature(pipe.__call__).parameters)
        needed = {"prompt", "num_inference_steps", "generator"}
        if not needed <= self._accepts:
            raise ValueError(
                f"{type(pipe).__name__} is not a text-to-image pipeline (its call takes no "
                f"{', '.join(sorted(needed - self._accepts))})"
            )
        if self._default_guidance is not None and "guidance_scale" not in self._accepts:
            raise ValueError(f"{type(pipe).__name__} takes no guidance_scale")
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe.to(self.config.device)
        self._lock = threading.Lock()  # torch modules are not safe to call from two threads at once

    @staticmethod
    def _launch_int(opts: dict[str, Any], key: str, low: int, high: int) -> int | None:
        if opts.get(key) is None:
            return None
        value = int(opts[key])
        if not low <= value <= high:
            raise ValueError(f"{key} must be from {low} to {high}, not {value}")
        return value

    @staticmethod
    def _launch_guidance(opts: dict[str, Any]) -> float | None:
        if opts.get("guidance_scale") is None:
            return None
        value = float(opts["guidance_scale"])
        if not 0 <= value <= MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be from 0 to {MAX_GUIDANCE:g}, not {value}")
        return value

    def _modules(self) -> list[Any]:
        import torch

        return [c for c in self._pipe.components.values() if isinstance(c, torch.nn.Module)]

    def park(self) -> None:
        park_modules(self._modules(), self.config.device)

    def wake(self) -> None:
        wake_modules(self._modules(), self.config.device)

    def close(self) -> None:
        del self._pipe
        if self.config.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _arguments(self, body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Validated pipeline keyword arguments (less the generator), the image count and the seed."""
        prompt = _text(body, "prompt")
        n = _int(body, "n", 1, MAX_IMAGES) or 1
        width, height = _size(body.get("size"))
        response_format = body.get("response_format")
        if response_format == "url":
            raise InvalidRequest("response_format 'url' is not supported: only b64_json is served")
        if response_format not in (None, "b64_json"):
            raise InvalidRequest(f"response_format must be 'b64_json', not {response_format!r}")
        if body.get("output_format") not in (None, "png"):
            raise InvalidRequest(f"output_format must be 'png', not {body.get('output_format')!r}")
        seed = _int(body, "seed", 0, 2**64 - 1)
        steps = _int(body, "num_inference_steps", 1, MAX_STEPS) or self._default_steps
        guidance = _guidance(body.get("guidance_scale"))
        guidance = self._default_guidance if guidance is None else guidance
        negative = None if body.get("negative_prompt") is None else _text(body, "negative_prompt")

        kwargs: dict[str, Any] = {"prompt": [prompt] * n, "output_type": "pil"}
        optional = {
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "negative_prompt": [negative] * n if negative is not None else None,
        }
        for key, value in optional.items():
            if value is None:
                continue
            if key not in self._accepts:
                raise InvalidRequest(f"model {self.config.model_uid!r} does not take {key}")
            kwargs[key] = value
        return kwargs, n, secrets.randbits(63) if seed is None else seed

    def _generate(self, kwargs: dict[str, Any], n: int, seed: int) -> list[str]:
        import torch

        # One generator per image, seeded seed, seed+1, ...: image i depends on its seed, not on n
        # (up to batched kernels' rounding) nor on the process-wide RNG. CPU generators give the same
        # starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed((seed + i) % 2**64) for i in range(n)]
        with self._lock:
            images = self._pipe(**kwargs, generator=generators).images
        encoded = []
        for image in images:
            out = io.BytesIO()
            image.save(out, format="PNG")
            encoded.append(base64.b64encode(out.getvalue()).decode("ascii"))
        return encoded

    async def warm_up(self) -> str:
        """One image at one denoising step (when the pipeline takes a step count)."""
        body: dict[str, Any] = {"prompt": "a shoal of fish", "seed": 0}
        if "num_inference_steps" in self._accepts:
            body["num_inference_steps"] = 1
        await self.generate_images(body)
        return "generate_images"

    async def generate_images(self, body: dict[str, Any]) -> dict[str, Any]:
        kwargs, n, seed = self._arguments(body)
        created = int(time.time())
        encoded = await asyncio.to_thread(self._generate, kwargs, n, seed)
        return {"created": created, "data": [{"b64_json": b64} for b64 in encoded]}
