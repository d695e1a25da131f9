"""Audio and image models from a hub, through the gateway's own download path (as LLMs are,
tests/test_hubs.py): the real `huggingface_hub` client in a real `shoal serve` talks through
HF_ENDPOINT to tests/hubserver.py, which serves the packaged Whisper tiny.en CTranslate2 folder
as a hub repo (launched, transcribing Piper's speech) and a diffusers pipeline layout of small
files (no runnable image weights exist here: its file choice and estimate are checked, and a pull).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ShoalServer, wait_until_ready
from test_engine_faster_whisper import SENTENCE, assert_mostly, synthesize, whisper_path
from test_hubs import Hub, _env, _until

WHISPER_REPO = "test-org/whisper-tiny.en-ct2"
WHISPER_FILES = ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
PIPELINE_REPO = "test-org/tiny-diffusers"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
    "feature_extractor": [None, None],
}  # fmt: skip
TEXT_CONFIG = {"architectures": ["CLIPTextModel"], "hidden_size": 32, "intermediate_size": 64,
               "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77,
               "vocab_size": 1000, "torch_dtype": "float32"}  # fmt: skip
# The files diffusers loads with no variant: the configs, the tokenizer and scheduler, and the
# float32 safetensors of each component (plain or sharded with its index).
PIPELINE_FILES = sorted([
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
])  # fmt: skip
# With variant "fp16": each component's fp16 weights instead (the vae's sharded ones with their
# fp16 index), the same configs, tokenizer and scheduler.
FP16_FILES = sorted([
    *(f for f in PIPELINE_FILES if not f.endswith((".safetensors", ".index.json"))),
    "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
])  # fmt: skip


def _safetensors(path: Path, dtype: str, shapes: dict[str, list[int]]) -> None:
    """A real safetensors file: the 8-byte length, the JSON header, zeros for the tensors."""
    size = {"F32": 4, "F16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _pipeline(repo: Path) -> None:
    """A diffusers pipeline's layout, the way sd-turbo's and FLUX.1-schnell's repos hold theirs:
    float32 and fp16 copies, .bin and Flax copies, a single-file checkpoint at the top, an ONNX
    export, and a component that model_index.json turns off."""
    _write(repo / "model_index.json", json.dumps(MODEL_INDEX))
    _write(repo / "README.md", "a tiny pipeline\n")
    _safetensors(repo / "tiny-single-file.safetensors", "F16", {"all": [512, 512]})
    _write(repo / "scheduler" / "scheduler_config.json", '{"_class_name": "EulerDiscreteScheduler"}')
    for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"):
        _write(repo / "tokenizer" / name, name)  # distinct contents: the cache stores one blob per content
    _write(repo / "text_encoder" / "config.json", json.dumps(TEXT_CONFIG))
    _safetensors(repo / "text_encoder" / "model.safetensors", "F32", {"embed": [1000, 32]})
    _safetensors(repo / "text_encoder" / "model.fp16.safetensors", "F16", {"embed": [1000, 32]})
    _write(repo / "text_encoder" / "pytorch_model.bin", "pickled copy")
    _write(repo / "unet" / "config.json", '{"_class_name": "UNet2DConditionModel"}')
    _safetensors(repo / "unet" / "diffusion_pytorch_model.safetensors", "F32", {"w": [256, 256]})
    _safetensors(repo / "unet" / "diffusion_pytorch_model.fp16.safetensors", "F16", {"w": [256, 256]})
    _write(repo / "unet" / "diffusion_flax_model.msgpack", "flax copy")
    _write(repo / "vae" / "config.json", '{"_class_name": "AutoencoderKL"}')
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    _write(repo / "vae" / "diffusion_pytorch_model.safetensors.index.json", json.dumps(index))
    _write(repo / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json", json.dumps(index))
    for i in (1, 2):
        shard = f"0000{i}-of-00002.safetensors"
        _safetensors(repo / "vae" / f"diffusion_pytorch_model-{shard}", "F32", {"a": [64, 64 + i]})
        _safetensors(repo / "vae" / f"diffusion_pytorch_model.fp16-{shard}", "F16", {"a": [64, 64 + i]})
    _write(repo / "safety_checker" / "config.json", "{}")
    _safetensors(repo / "safety_checker" / "model.safetensors", "F32", {"x": [128, 128]})
    _write(repo / "onnx" / "unet" / "model.onnx", "onnx export")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("media-hub")
    repos = root / "repos"
    whisper = repos / WHISPER_REPO
    whisper.mkdir(parents=True)
    for name in WHISPER_FILES:
        (whisper / name).symlink_to(whisper_path() / name)
    _write(whisper / "README.md", "Whisper tiny.en in CTranslate2\n")
    _write(whisper / "original" / "tiny.en.pt", "the OpenAI checkpoint, not loaded by faster-whisper")
    _pipeline(repos / PIPELINE_REPO)
    plain = repos / "test-org" / "plain-llm"
    _write(plain / "config.json", json.dumps({**TEXT_CONFIG, "architectures": ["LlamaForCausalLM"]}))
    _safetensors(plain / "model.safetensors", "F32", {"embed": [1000, 32]})
    srv = Hub(repos, root / "hub.log")
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media-cache")


@pytest.fixture(scope="module")
def shoal(hub: Hub, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("shoal-media")
    srv = ShoalServer(root / "data", root / "server.log", env=_env(hub, cache))
    srv.start()
    yield srv
    srv.stop()


def _snapshot_files(cache: Path, hub: str, repo: str) -> list[str]:
    snapshots = list((cache / hub / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir())
    assert len(snapshots) == 1, snapshots
    return sorted(str(p.relative_to(snapshots[0])) for p in snapshots[0].rglob("*") if p.is_file())


def _transcribe(srv: ShoalServer, uid: str, wav: bytes) -> str:
    answer = srv.http.post(
        "/v1/audio/transcriptions", data={"model": uid}, files={"file": ("speech.wav", wav, "audio/wav")}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


WHISPER_FAMILY = {
    "model_name": "whisper-from-hub", "model_type": "audio", "model_ability": ["audio2text"],
    "context_length": 448,
    "model_specs": [{"model_format": "ctranslate2", "model_size_in_billions": 0.039,
                     "source": {"hf_repo": WHISPER_REPO}}],
}  # fmt: skip


def test_whisper_from_the_hub_downloads_in_the_gateway_and_transcribes(
    shoal: ShoalServer, hub: Hub, cache: Path, tmp_path: Path
) -> None:
    wav = synthesize(SENTENCE)
    model_bin = (whisper_path() / "model.bin").stat().st_size
    name = f"hf.co/{WHISPER_REPO}"
    # The estimate before any download: the repo's file sizes (model.bin is the weights).
    estimate = shoal.http.post("/v1/models/estimate", json={"model_name": name, "model_type": "audio"})
    assert estimate.status_code == 200, estimate.text
    before = estimate.json()
    assert before["model_engine"] == "faster_whisper" and before["download"]["cached"] is False
    assert before["estimate"]["weights"] == model_bin
    wanted = sum((whisper_path() / f).stat().st_size for f in WHISPER_FILES)
    assert before["download"]["total_bytes"] == wanted  # not the README nor original/tiny.en.pt

    hub.post("/_reset")
    hub.post(f"/_hold?after={24 * 1024**2}")
    try:
        body = {"model_name": name, "model_type": "audio", "model_uid": "stt"}
        answer = shoal.http.post("/v1/models?wait_ready=false", json=body)
        assert answer.status_code == 200, answer.text
        seen = _until(shoal, "stt", lambda d: (d.get("download") or {}).get("completed_bytes"))
        assert seen["status"] == "downloading" and seen["download"]["total_bytes"] == wanted
        assert 0 < seen["download"]["completed_bytes"] < wanted
    finally:
        hub.post("/_release")
    _until(shoal, "stt", lambda d: d["status"] != "downloading")
    requests = hub.stats()["requests"]  # every hub call the gateway made: the runner starts now
    wait_until_ready(shoal, "stt")
    assert_mostly(_transcribe(shoal, "stt", wav))
    assert hub.stats()["requests"] == requests + 1  # only this /_stats: the runner called no hub
    fetched = sorted({r[0].removeprefix(WHISPER_REPO + "/") for r in hub.stats()["gets"]})
    assert fetched == WHISPER_FILES, fetched
    assert _snapshot_files(cache, "hub", WHISPER_REPO) == WHISPER_FILES
    after = shoal.http.post("/v1/models/estimate", json={"model_name": name, "model_type": "audio"}).json()
    assert after["download"]["cached"] is True and after["estimate"]["weights"] == model_bin
    listed = {e["name"]: e for e in shoal.http.get("/v1/cache/models").json()["data"]}
    assert listed[name]["model_uids"] == ["stt"] and listed[name]["size_bytes"] == wanted
    # A catalog entry naming the repo estimates from the hub too (no longer from its size).
    registered = shoal.http.post(
        "/v1/model_registrations/audio", json={"model": WHISPER_FAMILY, "persist": False}
    )
    assert registered.status_code == 200, registered.text
    entry = shoal.http.post("/v1/models/estimate", json={"model_name": "whisper-from-hub"}).json()
    assert entry["download"]["name"] == name and entry["download"]["cached"] is True
    assert entry["estimate"]["weights"] == model_bin
    assert shoal.http.delete("/v1/models/stt").status_code == 200

    # Offline (HF_HUB_OFFLINE=1), the catalog entry and the hub name launch from the cache, with
    # no call to the hub at all.
    hub.post("/_reset")
    offline = ShoalServer(
        tmp_path / "data", tmp_path / "server.log", env=_env(hub, cache, HF_HUB_OFFLINE="1")
    )
    offline.start()
    try:
        registered = offline.http.post(
            "/v1/model_registrations/audio", json={"model": WHISPER_FAMILY, "persist": False}
        )
        assert registered.status_code == 200, registered.text
        answer = offline.http.post("/v1/models", json={"model_name": "whisper-from-hub"})
        assert answer.status_code == 200, answer.text
        assert_mostly(_transcribe(offline, "whisper-from-hub", wav))
        by_name = offline.http.post("/v1/models/estimate", json={"model_name": name, "model_type": "audio"})
        assert by_name.status_code == 200 and by_name.json()["download"]["cached"] is True, by_name.text
    finally:
        offline.stop()
    assert hub.stats()["requests"] == 1  # this /_stats alone
    assert (
        shoal.http.delete(f"/v1/model_registrations/audio/{WHISPER_FAMILY['model_name']}").status_code == 200
    )


def test_diffusers_pipeline_from_the_hub_picks_one_precision(
    shoal: ShoalServer, hub: Hub, cache: Path
) -> None:
    repo = Path(hub.root) / PIPELINE_REPO
    total = sum((repo / f).stat().st_size for f in PIPELINE_FILES)
    weights = sum((repo / f).stat().st_size for f in PIPELINE_FILES if f.endswith(".safetensors"))
    hub.post("/_reset")
    for body in (
        {"model_name": f"hf.co/{PIPELINE_REPO}", "model_type": "image"},
        {"model_name": f"hf.co/{PIPELINE_REPO}"},  # model_index.json says image
        {"model_name": f"modelscope.cn/{PIPELINE_REPO}", "model_type": "image"},
    ):
        answer = shoal.http.post("/v1/models/estimate", json=body)
        assert answer.status_code == 200, (body, answer.text)
        est = answer.json()
        assert est["model_engine"] == "diffusers", est
        assert est["download"]["total_bytes"] == total and est["download"]["cached"] is False, est
        assert est["estimate"]["weights"] == weights, est["estimate"]
    # Before download: model_index.json and text_encoder/config.json whole, the safetensors'
    # headers, all by bounded range requests, and nothing else.
    gets = hub.stats()["gets"]
    read = {r[0].removeprefix("ms/").split("/", 2)[2] for r in gets}
    headers = {f for f in PIPELINE_FILES if f.endswith(".safetensors")}
    assert read == {"model_index.json", "text_encoder/config.json"} | headers, read
    assert all(r[1].startswith("bytes=") and not r[1].endswith("-") for r in gets), gets
    # A catalog entry naming the repo (as sd-turbo and FLUX.1-schnell do) picks the same files.
    family = {
        "model_name": "tiny-diffusers", "model_type": "image", "model_ability": ["text2image"],
        "model_specs": [{"model_format": "diffusers", "model_size_in_billions": 0.001,
                         "source": {"hf_repo": PIPELINE_REPO}}],
    }  # fmt: skip
    registered = shoal.http.post("/v1/model_registrations/image", json={"model": family, "persist": False})
    assert registered.status_code == 200, registered.text
    pulled = shoal.http.post("/v1/cache/models", json={"model_name": "tiny-diffusers", "stream": False})
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    assert _snapshot_files(cache, "hub", PIPELINE_REPO) == PIPELINE_FILES
    est = shoal.http.post("/v1/models/estimate", json={"model_name": "tiny-diffusers"}).json()
    assert est["download"]["cached"] is True and est["estimate"]["weights"] == weights, est
    listed = {e["name"]: e for e in shoal.http.get("/v1/cache/models").json()["data"]}
    assert listed[f"hf.co/{PIPELINE_REPO}"]["size_bytes"] == total
    assert shoal.http.delete("/v1/model_registrations/image/tiny-diffusers").status_code == 200
    assert shoal.http.delete(f"/v1/cache/models/hf.co/{PIPELINE_REPO}").status_code == 200


def test_a_variant_picks_that_precision_and_a_bad_one_is_refused(shoal: ShoalServer, hub: Hub) -> None:
    repo = Path(hub.root) / PIPELINE_REPO
    total = sum((repo / f).stat().st_size for f in FP16_FILES)
    weights = sum((repo / f).stat().st_size for f in FP16_FILES if f.endswith(".safetensors"))
    name = f"hf.co/{PIPELINE_REPO}"
    hub.post("/_reset")
    answer = shoal.http.post("/v1/models/estimate", json={"model_name": name, "variant": "fp16"})
    assert answer.status_code == 200, answer.text
    est = answer.json()
    assert est["download"]["total_bytes"] == total and est["estimate"]["weights"] == weights, est
    read = {r[0].split("/", 2)[2] for r in hub.stats()["gets"]}
    assert read == {"model_index.json", "text_encoder/config.json"} | {
        f for f in FP16_FILES if f.endswith(".safetensors")
    }, read  # the fp16 files' headers, not the float32 ones'
    for variant, words in [
        ("int8", "no weights of variant 'int8'"),  # the repo has none
        ("../fp16", "variant must be"),
        (16, "variant must be"),
        ("", "variant must be"),
    ]:
        for route in ("/v1/models", "/v1/models/estimate"):
            answer = shoal.http.post(route, json={"model_name": name, "variant": variant})
            assert answer.status_code == 400, (variant, answer.text)
            error = answer.json()["error"]
            assert words in error["message"] and error["type"] == "invalid_request_error", error
    pulled = shoal.http.post("/v1/cache/models", json={"model_name": name, "variant": "x/y", "stream": False})
    assert pulled.status_code == 400 and "variant must be" in pulled.json()["error"]["message"], pulled.text
    # an engine that takes no variant refuses it
    whisper = {"model_name": f"hf.co/{WHISPER_REPO}", "model_type": "audio", "variant": "fp16"}
    answer = shoal.http.post("/v1/models", json=whisper)
    assert answer.status_code == 400 and "variant" in answer.json()["error"]["message"], answer.text


def test_a_pulled_pipeline_loads_in_diffusers(
    shoal: ShoalServer, hub: Hub, cache: Path, tmp_path: Path
) -> None:
    """A real (tiny, random) pipeline as diffusers saves it, with fp16 copies and a single-file
    checkpoint beside it: the gateway fetches one precision, and diffusers loads it from the cache
    with no network (its images are noise)."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import DiffusionPipeline

    from shoal.engines.base import EngineConfig
    from shoal.engines.diffusers import DiffusersEngine
    from test_engine_diffusers import build_tiny_pipeline, generate, pngs

    built, half = tmp_path / "tiny-sd", tmp_path / "fp16"
    build_tiny_pipeline(built)
    saved = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    DiffusionPipeline.from_pretrained(str(built)).to(torch.float16).save_pretrained(str(half), variant="fp16")
    repo = Path(hub.root) / "test-org" / "tiny-sd"
    shutil.copytree(built, repo)
    for weights in half.rglob("*.fp16.safetensors"):
        shutil.copy(weights, repo / weights.relative_to(half))
    shutil.copy(
        built / "unet" / "diffusion_pytorch_model.safetensors", repo / "tiny-sd-single-file.safetensors"
    )
    body = {"model_name": "hf.co/test-org/tiny-sd", "model_type": "image", "stream": False}
    pulled = shoal.http.post("/v1/cache/models", json=body)
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    assert _snapshot_files(cache, "hub", "test-org/tiny-sd") == saved  # as diffusers saved it, no more
    snapshot = next((cache / "hub" / "models--test-org--tiny-sd" / "snapshots").iterdir())
    config = EngineConfig(model_path=snapshot, model_uid="tiny-sd", model_format="diffusers",
                          context_length=None, n_threads=2, options={"num_inference_steps": 1})  # fmt: skip
    engine = DiffusersEngine(config)
    engine.load()  # local_files_only: the cache's files are all it needs
    try:
        assert pngs(generate(engine, seed=1))[0].startswith(b"\x89PNG")
    finally:
        engine.close()

    # with variant fp16: the fp16 weights only, which diffusers loads when told the variant
    shutil.rmtree(cache / "hub" / "models--test-org--tiny-sd")
    pulled = shoal.http.post("/v1/cache/models", json={**body, "variant": "fp16"})
    assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
    halves = sorted(str(p.relative_to(half)) for p in half.rglob("*.fp16.safetensors"))
    assert halves and _snapshot_files(cache, "hub", "test-org/tiny-sd") == sorted(
        [*(f for f in saved if not f.endswith(".safetensors")), *halves]
    )
    options = {"num_inference_steps": 1, "variant": "fp16"}
    engine = DiffusersEngine(replace(config, options=options))
    engine.load()
    try:
        assert pngs(generate(engine, seed=1))[0].startswith(b"\x89PNG")
    finally:
        engine.close()


def test_media_hub_names_refused_clearly(shoal: ShoalServer) -> None:
    for body, words in [
        ({"model_name": f"hf.co/{WHISPER_REPO}", "model_type": "image"}, "ctranslate2"),
        ({"model_name": f"hf.co/{PIPELINE_REPO}", "model_type": "LLM"}, "model_type 'image'"),
        ({"model_name": "hf.co/test-org/plain-llm", "model_type": "audio"}, "neither"),
    ]:
        for route in ("/v1/models", "/v1/models/estimate"):
            answer = shoal.http.post(route, json=body)
            assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text


def test_media_file_selection() -> None:
    """Pure: which files each engine's repo layout gives (no server)."""
    from shoal.errors import InvalidRequest
    from shoal.hub.names import parse
    from shoal.hub.remote import RemoteFile, RemoteRepo, select

    def repo(*paths: str) -> RemoteRepo:
        return RemoteRepo("o/r", "c" * 40, tuple(RemoteFile(p, 10) for p in paths))

    ref = parse("hf.co/o/r")
    assert ref is not None
    # mobiuslabsgmbh/faster-whisper-large-v3-turbo's files
    turbo_files = ["config.json", "model.bin", "preprocessor_config.json", "tokenizer.json"]
    turbo_files.append("vocabulary.json")
    turbo = repo("README.md", ".gitattributes", *turbo_files)
    chosen = select(ref, turbo, None)
    assert (chosen.model_format, chosen.model_type, chosen.target) == ("ctranslate2", "audio", "")
    assert sorted(f.path for f in chosen.files) == sorted(turbo_files)
    flux = repo(  # FLUX.1-schnell's layout, shortened
        "model_index.json", "flux1-schnell.safetensors", "ae.safetensors",
        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/config.json",
        "tokenizer_2/spiece.model", "scheduler/scheduler_config.json",
    )  # fmt: skip
    index = {
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }  # fmt: skip
    picked = select(ref, flux, "image", "diffusers", index)
    assert sorted(f.path for f in picked.files) == sorted(
        p.path for p in flux.files if p.path not in ("flux1-schnell.safetensors", "ae.safetensors")
    )
    only_fp16 = repo("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors")
    unet = {"unet": ["diffusers", "UNet2DConditionModel"]}
    with pytest.raises(InvalidRequest, match="fp16"):
        select(ref, only_fp16, "image", "diffusers", unet)
    # variant fp16: that copy (as diffusers' variant_compatible_siblings picks it)
    picked = select(ref, only_fp16, "image", "diffusers", unet, "fp16")
    assert sorted(f.path for f in picked.files) == sorted(p.path for p in only_fp16.files)
    # a component without the variant keeps its plain weights, as diffusers falls back to them;
    # the legacy spelling of sharded variants (model-00001-of-00002.fp16.safetensors) counts too
    mixed = repo(
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin", "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder/model-00001-of-00002.fp16.safetensors",
        "text_encoder/model-00002-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors.fp16.index.json", "text_encoder/model.fp16.bin",
    )  # fmt: skip
    both = {**unet, "text_encoder": ["transformers", "CLIPTextModel"]}
    picked = select(ref, mixed, "image", "diffusers", both, "fp16")
    assert sorted(f.path for f in picked.files) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model-00001-of-00002.fp16.safetensors",
        "text_encoder/model-00002-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors.fp16.index.json",
    ])  # fmt: skip
    with pytest.raises(InvalidRequest, match="no weights of variant 'bf16'"):
        select(ref, mixed, "image", "diffusers", both, "bf16")
    joe = "en/en_US/joe/medium/en_US-joe-medium.onnx"  # rhasspy/piper-voices' layout
    voices = repo(joe, joe + ".json", "en/en_US/amy/low/en_US-amy-low.onnx", "voices.json")
    voice = select(replace(ref, file=joe), voices, "audio", "piper")
    assert voice.target.endswith("joe-medium.onnx") and len(voice.files) == 2
