"""The GPU check: on one NVIDIA GPU, launch in the order that fails in Xinference — a transformers
LLM, then an embedding model, then a second transformers LLM — all on GPU 0; send each a request;
print per model its estimate, reservation and NVML-measured use; then relaunch two of them to show
the estimate error before and after a measured profile (the relaunch placed on its profile, goal
within 10% of NVML); then show a 507 and an eviction (or a park); then park and wake, and a
defragmenting move where there are two GPUs (scripts/gpu_check_park.py). With --mps the server runs
the CUDA MPS daemon, and a process joined to it past its cap (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, as
Shoal sets it for runners) must fail alone while a neighbouring model keeps answering. Exits
non-zero if a launch fails, a measurement exceeds its reservation, a profile misses its goal or the
MPS cap does not hold.

There is no network on the GPU machine and no model small enough to carry, so the models are built
here with random weights (a trained-on-the-spot BPE tokenizer, Llama-shaped LLMs, a BERT encoder):
memory behaviour is what is checked, not the text. Wheels for the packages the machine lacks:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
      fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection orjson httptools \\
      typing_extensions annotated-doc opentelemetry-api python-multipart   # the versions in .venv
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check_park  # noqa: E402  (its sibling: the park/wake and move sections)

GiB = 1024**3
# GPU_CHECK_DRY=1: rehearse the whole flow on a machine without a GPU, on a declared fake 80 GiB GPU.
DRY_RUN = os.environ.get("GPU_CHECK_DRY") == "1"
WORDS = (
    "the a model memory gpu shares placed reserve measure estimate evict idle request answer token cache "
    "layer head weight batch context user assistant system hello world server shoal fish sea wave"
).split()


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_models(root: Path) -> dict[str, Path]:
    """Random-weight models saved as a user would have them on disk."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(24)) for i in range(400)]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    paths = {}
    sizes = (("llm-a", 512, 4, 1408), ("llm-b", 768, 6, 2048)) if DRY_RUN else (
        ("llm-a", 1024, 16, 2816), ("llm-b", 2048, 16, 5632))  # fmt: skip
    for name, hidden, layers, inter in sizes:
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        log(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, bf16")
    bert_dir = root / "bert"
    BertModel(
        BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
        )
    ).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    encoder = st_models.Transformer(str(bert_dir), max_seq_length=256)
    st = SentenceTransformer(modules=[encoder, st_models.Pooling(384, "mean"), st_models.Normalize()])
    paths["emb"] = root / "emb"
    st.save(str(paths["emb"]))
    log("built emb: 6-layer BERT, 384 dims, sentence-transformers folder")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nvml_by_pid() -> dict[int, int]:
    import pynvml

    if DRY_RUN:
        return {}
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid: int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


def pct(estimate: int, used: int) -> str:
    return f"{(estimate - used) / used * 100:+.1f}%" if used else "n/a"


def wait_gone(http: httpx.Client, uid: str) -> None:
    r = http.delete(f"/v1/models/{uid}")
    assert r.status_code == 200, r.text
    time.sleep(1)  # terminate waits for NVML to drop the runner; a breath more for the driver


def profile_round(http: httpx.Client, launches: dict[str, dict[str, Any]], failures: list[str]) -> list[dict]:
    """Estimate error before and after a profile: each model's first launch was placed by the formula
    (or the formula corrected by profiles of models measured before it) and then profiled; relaunched,
    it is placed on its stored profile, whose error against NVML should be within 10%."""
    requests = {
        "llm-a": ("/v1/chat/completions", {"model": "llm-a", "max_tokens": 16, "messages": [
            {"role": "user", "content": "hello shoal"}]}),
        "emb": ("/v1/embeddings", {"model": "emb", "input": ["memory is shared"] * 32}),
    }  # fmt: skip
    rows = []
    for uid, (route, body) in requests.items():
        first = http.get(f"/v1/models/{uid}").json()
        rep, est = first["replicas"][0], first["estimate"]
        before_nvml = nvml_by_pid().get(rep["pid"], 0)
        wait_gone(http, uid)
        r = http.post("/v1/models", json={**launches[uid], "model_uid": uid, "gpu_idx": [0]})
        if r.status_code != 200:
            failures.append(f"relaunch {uid}: {r.status_code} {r.text[:300]}")
            continue
        http.post(route, json=body)
        time.sleep(3)
        again = http.get(f"/v1/models/{uid}").json()
        rep2 = again["replicas"][0]
        after_nvml = nvml_by_pid().get(rep2["pid"], 0)
        # the model's estimate now says "profile"; its replica keeps the figure that placed it
        first_source = "formula" if rep["estimate_bytes"] == est.get("formula_per_device") else "corrected"
        row = {
            "uid": uid,
            "first_source": first_source,
            "formula": est.get("formula_per_device"),
            "first_estimate": rep["estimate_bytes"],
            "profile": rep["profile_bytes"],
            "nvml_first": before_nvml,
            "relaunch_source": again["estimate"].get("memory_source"),
            "relaunch_estimate": rep2["estimate_bytes"],
            "nvml_relaunch": after_nvml,
        }
        rows.append(row)
        print(
            f"{uid:6} first {row['first_source']:9} {rep['estimate_bytes'] / GiB:6.2f} GiB "
            f"(error {pct(rep['estimate_bytes'], before_nvml)}), profile "
            f"{(rep['profile_bytes'] or 0) / GiB:6.2f} GiB; relaunch {row['relaunch_source']:7} "
            f"{rep2['estimate_bytes'] / GiB:6.2f} GiB vs NVML {after_nvml / GiB:6.2f} GiB "
            f"(error {pct(rep2['estimate_bytes'], after_nvml)})"
        )
        if row["relaunch_source"] != "profile":
            failures.append(f"{uid} relaunch placed by {row['relaunch_source']}, not its profile")
        if not DRY_RUN and (not after_nvml or abs(rep2["estimate_bytes"] - after_nvml) > 0.10 * after_nvml):
            failures.append(
                f"{uid} profile error {pct(rep2['estimate_bytes'], after_nvml)} (goal within 10%)"
            )
    return rows


MPS_HOG = """
import torch
torch.empty(0, device="cuda")  # joins the MPS server with the environment it was given
held, step = [], 64 * 1024**2
try:
    while True:
        held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError:
    print(len(held) * step)
"""


def mps_round(http: httpx.Client, data_dir: Path, failures: list[str]) -> dict[str, Any]:
    """A process joined to Shoal's MPS daemon with a 1 GiB cap (the variables Shoal gives its
    runners) allocates until it fails; it must stop within its cap, and llm-b must keep answering."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from shoal.hosts.mps import mps_env

    gpu = next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == "gpu:0")
    status = gpu.get("mps") or {}
    log(f"MPS: {'on' if status.get('enabled') else 'off'} ({status.get('reason')})")
    if not status.get("enabled"):
        failures.append(f"--mps asked but MPS is off: {status.get('reason')}")
        return {"mps": status}
    cap = 1 * GiB
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    env.update(mps_env(str(data_dir / "mps" / "pipe"), str(data_dir / "mps" / "log"), cap, 1))
    hog = subprocess.run(
        [sys.executable, "-c", MPS_HOG], env=env, capture_output=True, text=True, timeout=300
    )
    reached = int(hog.stdout.strip() or 0)
    log(f"MPS hog capped at {cap / GiB:.2f} GiB: allocated {reached / GiB:.2f} GiB, then rc {hog.returncode}")
    r = http.post("/v1/chat/completions", json={"model": "llm-b", "max_tokens": 8, "messages": [
        {"role": "user", "content": "still there?"}]})  # fmt: skip
    log(f"neighbour llm-b after the hog: {r.status_code}")
    if not 0 < reached <= cap:
        failures.append(f"MPS cap of {cap} not enforced: the hog allocated {reached} ({hog.stderr[-300:]})")
    if r.status_code != 200:
        failures.append(f"neighbour llm-b answered {r.status_code} after the MPS hog")
    return {"mps": status, "cap": cap, "hog_allocated": reached, "neighbour_status": r.status_code}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=("all", "park"),
        default="all",
        help="park: only the park/wake and move sections (with GPU_CHECK_DRY=1: on two fake GPUs)",
    )
    parser.add_argument("--mps", action="store_true", help="serve with CUDA MPS and check its memory cap")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    paths = build_models(root / "models")
    port = free_port()
    server_log = root / "server.log"
    # The dry run profiles its CPU-computing runners too (their RSS peak), to rehearse that path.
    fake = (
        ["--fake-gpus", "2x80GiB" if args.only == "park" else "1x80GiB", "--profile", "all"]
        if DRY_RUN
        else []
    )
    fake += ["--mps"] if args.mps else []
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(root / "data"),
            *fake,
        ],
        stdout=open(server_log, "wb"),
        stderr=subprocess.STDOUT,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        for _ in range(300):
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        gpu = next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == "gpu:0")
        log(
            f"gpu:0 {gpu['name']}: {gpu['total_bytes'] / GiB:.2f} GiB, used by others "
            f"{gpu['used_by_others_bytes'] / GiB:.2f} GiB"
        )
        register(http, paths)
        checked: dict[str, Any] = {}
        if args.only == "all":
            checked = placement(http, failures, root / "data" if args.mps else None)
        park = {
            "park_and_wake": gpu_check_park.park_and_wake(http, log, nvml_by_pid, failures),
            "move": gpu_check_park.defragment(http, log, failures),
        }
        (Path(os.environ.get("OUT", root)) / "gpu-check.json").write_text(
            json.dumps({**checked, "park": park, "failures": failures}, indent=2)
        )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        tail = server_log.read_text(errors="replace").splitlines()[-25:]
        print("\n--- server log (tail) ---\n" + "\n".join(tail))
    print("\nRESULT:", "PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


def register(http: httpx.Client, paths: dict[str, Path]) -> None:
    for name, kind, fmt in (
        ("llm-a", "LLM", "pytorch"),
        ("llm-b", "LLM", "pytorch"),
        ("emb", "embedding", "sentence_transformers"),
    ):
        spec = {
            "model_name": f"gc-{name}",
            "context_length": 4096,
            "model_specs": [{"model_format": fmt, "model_uri": str(paths[name])}],
        }
        r = http.post(f"/v1/model_registrations/{kind}", json={"model": spec, "persist": False})
        assert r.status_code == 200, r.text


def placement(http: httpx.Client, failures: list[str], mps_data_dir: Path | None) -> dict[str, Any]:
    """The placement checks: three models on GPU 0 in Xinference's failing order, the estimate error
    before and after a profile, the MPS cap (with `mps_data_dir`), the 507, an eviction or a park."""
    # The order Xinference refuses: LLM, then embedding, then a second LLM, all on GPU 0.
    launches = [
        (
            "llm-a",
            {
                "model_name": "gc-llm-a",
                "model_engine": "transformers",
                "context_length": 2048,
                "max_batch_size": 4,
                "keep_alive": 0,
            },
        ),
        ("emb", {"model_name": "gc-emb", "keep_alive": 0}),
        (
            "llm-b",
            {
                "model_name": "gc-llm-b",
                "model_engine": "transformers",
                "context_length": 2048,
                "max_batch_size": 4,
            },
        ),
    ]
    by_uid = dict(launches)
    for uid, body in launches:
        started = time.monotonic()
        r = http.post("/v1/models", json={**body, "model_uid": uid, "gpu_idx": [0]})
        if r.status_code != 200:
            failures.append(f"launch {uid}: {r.status_code} {r.text}")
            log(f"LAUNCH FAILED {uid}: {r.status_code} {r.text[:2000]}")
            continue
        log(f"launched {uid} on gpu:0 in {time.monotonic() - started:.1f} s")
    for uid in ("llm-a", "llm-b"):
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": uid,
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "hello shoal"}],
            },
        )
        ok = r.status_code == 200
        log(f"chat {uid}: {r.status_code} " + (f"{r.json()['usage']}" if ok else r.text[:500]))
        if not ok:
            failures.append(f"chat {uid}: {r.status_code}")
    r = http.post("/v1/embeddings", json={"model": "emb", "input": ["memory is shared", "gpu placed"] * 16})
    log(
        f"embeddings emb: {r.status_code} "
        + (f"{len(r.json()['data'])} vectors" if r.status_code == 200 else r.text[:500])
    )
    if r.status_code != 200:
        failures.append("embeddings emb")
    time.sleep(3)  # the supervisor samples NVML every 2 s
    direct = nvml_by_pid()
    report: list[dict[str, Any]] = []
    header = ("model", "estimate GiB", "reserved GiB", "measured GiB", "NVML now GiB")
    print("\n{:8} {:>13} {:>13} {:>13} {:>13}  parts".format(*header))
    for uid in ("llm-a", "emb", "llm-b"):
        described = http.get(f"/v1/models/{uid}").json()
        if "replicas" not in described:
            continue
        rep = described["replicas"][0]
        est = described["estimate"]
        now = direct.get(rep["pid"], 0)
        # the highest use the ledger saw (peak_bytes; measured_bytes is the latest sample)
        peak = rep.get("peak_bytes", rep["measured_bytes"])
        measured = max(peak or 0, now)
        parts = ", ".join(
            f"{k} {est[k] / GiB:.2f}" for k in ("weights", "kv_cache", "activations", "cuda_context")
        )
        print(
            f"{uid:8} {rep['estimate_bytes'] / GiB:13.2f} {rep['reserved_bytes'] / GiB:13.2f} "
            f"{(peak or 0) / GiB:13.2f} {now / GiB:13.2f}  {parts}"
        )
        report.append(
            {
                "uid": uid,
                "device": rep["device"],
                "estimate": rep["estimate_bytes"],
                "reserved": rep["reserved_bytes"],
                "measured": peak,
                "nvml_now": now,
            }
        )
        if rep["device"] != "gpu:0":
            failures.append(f"{uid} on {rep['device']}")
        held = rep["profile_bytes"] or rep["estimate_bytes"]  # its profile, once measured
        if measured > held:
            failures.append(f"{uid} measured {measured} > reservation {held}")
    print("\nestimate error before and after a profile (estimate - NVML) / NVML:")
    profiled = profile_round(http, by_uid, failures)
    checked_mps = mps_round(http, mps_data_dir, failures) if mps_data_dir is not None else None
    gpu = next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == "gpu:0")
    log(
        f"gpu:0 now: reserved {gpu['reserved_bytes'] / GiB:.2f} GiB by {len(gpu['models'])} replicas, "
        f"free {gpu['free_bytes'] / GiB:.2f} GiB, others {gpu['used_by_others_bytes'] / GiB:.2f} GiB"
    )

    # Too big for any GPU: a 507 that names the numbers.
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-a",
            "model_uid": "too-big",
            "model_engine": "transformers",
            "gpu_memory": f"{int(gpu['total_bytes'] / GiB) + 8}GiB",
        },
    )
    log(f"too big: {r.status_code} {r.json()['error']['message']}")
    if r.status_code != 507:
        failures.append(f"too-big answered {r.status_code}")
    # Fill the GPU, then launch once more: idle replicas past keep_alive 0 go, least recently used first.
    filler = gpu["free_bytes"] - int(0.5 * GiB)
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-b",
            "model_uid": "filler",
            "model_engine": "transformers",
            "gpu_memory": filler,
            "context_length": 512,
            "max_batch_size": 1,
            "pinned": True,
        },
    )
    log(f"filler declaring {filler / GiB:.2f} GiB: {r.status_code}")
    old_pids = {uid: http.get(f"/v1/models/{uid}").json()["replicas"][0]["pid"] for uid in ("llm-a", "emb")}
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-a",
            "model_uid": "late",
            "model_engine": "transformers",
            "context_length": 512,
            "max_batch_size": 1,
        },
    )
    statuses = {
        uid: http.get(f"/v1/models/{uid}").json()["status"] for uid in ("llm-a", "emb", "llm-b", "late")
    }
    log(f"late launch: {r.status_code}; statuses now {statuses}")
    # llm-a (transformers) parks where host RAM allows: its process stays, its GPU memory goes
    evicted = [uid for uid in old_pids if statuses.get(uid) in ("evicted", "parked")]
    still = nvml_by_pid()
    log(f"evicted or parked: {evicted}; their pids in NVML: {[u for u in evicted if old_pids[u] in still]}")
    if r.status_code != 200 or statuses.get("llm-a") not in ("evicted", "parked"):
        failures.append(f"eviction: late={r.status_code} statuses={statuses}")
    return {"report": report, "profiles": profiled, "mps": checked_mps}


if __name__ == "__main__":
    sys.exit(main())
