"""The diffusers engine on CPU, through its public methods, on a tiny random Stable-Diffusion-style
pipeline that the test builds and saves itself (no network, no downloaded weights): the images are
noise, but their count, size, format and seeding are real."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from shoal.engines.base import EngineConfig
from shoal.errors import InvalidRequest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from shoal.engines.diffusers import DiffusersEngine  # noqa: E402

STEPS = 2  # launch default, so each request stays fast


def build_tiny_pipeline(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # A character-level BPE vocabulary (no merges): every lower-case word still tokenizes.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tok_dir = path.parent / "tokenizer-src"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe: Any = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffusersEngine]:
    path = tmp_path_factory.mktemp("tiny-sd") / "model"
    build_tiny_pipeline(path)
    eng = DiffusersEngine(
        EngineConfig(
            model_path=path,
            model_uid="tiny-sd",
            model_format="diffusers",
            context_length=None,
            n_threads=2,
            options={"num_inference_steps": STEPS},
        )
    )
    eng.load()
    yield eng
    eng.close()


def generate(engine: DiffusersEngine, **body: Any) -> dict[str, Any]:
    return asyncio.run(engine.generate_images({"prompt": "a red fox in the snow", "size": "64x64", **body}))


def pngs(result: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in result["data"]]


def close(a: bytes, b: bytes) -> bool:
    import numpy as np

    x, y = (np.asarray(Image.open(io.BytesIO(raw)), dtype=np.int16) for raw in (a, b))
    return x.shape == y.shape and int(np.abs(x - y).max()) <= 2


def test_images_have_the_requested_count_size_and_format(engine: DiffusersEngine) -> None:
    result = generate(engine, n=2, size="64x96", seed=1)
    assert isinstance(result["created"], int)
    assert len(result["data"]) == 2
    assert all(set(item) == {"b64_json"} for item in result["data"])
    for raw in pngs(result):
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(raw))
        image.load()
        assert image.format == "PNG"
        assert image.size == (64, 96)  # (width, height)
        assert image.mode == "RGB"


def test_seed_reproduces_and_varies(engine: DiffusersEngine) -> None:
    first = pngs(generate(engine, seed=7))
    again = pngs(generate(engine, seed=7, response_format="b64_json"))
    other = pngs(generate(engine, seed=8))
    assert first == again
    assert first != other
    # one generator per image, seeded seed+i: image i does not depend on n (up to the rounding of
    # batched kernels, which may differ from one batch size to another by a pixel level)
    pair = pngs(generate(engine, seed=7, n=2))
    assert close(pair[0], first[0])
    assert close(pair[1], other[0])
    assert not close(pair[0], pair[1])


def test_request_options_are_used(engine: DiffusersEngine) -> None:
    plain = pngs(generate(engine, seed=3))
    assert pngs(generate(engine, seed=3, negative_prompt="blurry")) != plain
    assert pngs(generate(engine, seed=3, guidance_scale=1.0)) != plain
    assert pngs(generate(engine, seed=3, num_inference_steps=1)) != plain


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x" * 4001}, "4000"),
        ({"size": "100x100"}, "size"),
        ({"size": "32x32"}, "size"),
        ({"size": "4096x512"}, "size"),
        ({"size": "512"}, "size"),
        ({"n": 9}, "n must"),
        ({"n": 0}, "n must"),
        ({"n": True}, "n must"),
        ({"response_format": "url"}, "only b64_json"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"seed": -1}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"negative_prompt": 5}, "negative_prompt"),
    ],
)
def test_bad_input_is_refused(engine: DiffusersEngine, body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        generate(engine, **body)


def test_unknown_launch_option_is_refused(tmp_path: Path) -> None:
    eng = DiffusersEngine(
        EngineConfig(
            model_path=tmp_path,
            model_uid="x",
            model_format="diffusers",
            context_length=None,
            options={"num_steps": 4},
        )
    )
    with pytest.raises(ValueError, match="unknown option"):
        eng.load()


def test_runner_route_answers_openai_shapes(engine: DiffusersEngine) -> None:
    from starlette.testclient import TestClient

    from shoal.runners.app import build_runner_app

    with TestClient(build_runner_app(engine)) as client:
        ok = client.post("/v1/images/generations", json={"prompt": "a boat", "size": "64x64", "seed": 7})
        assert ok.status_code == 200, ok.text
        assert pngs(ok.json()) == pngs(generate(engine, seed=7, prompt="a boat"))
        bad = client.post("/v1/images/generations", json={"prompt": "a boat", "response_format": "url"})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        assert "only b64_json" in bad.json()["error"]["message"]
