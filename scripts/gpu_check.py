"""The GPU check: on one NVIDIA GPU, launch in the order that fails in Xinference — a transformers
LLM, then an embedding model, then a second transformers LLM — all on GPU 0; send each a request;
print per model its estimate, reservation and NVML-measured use; then, for each of the three, the
estimate error before and after a measured profile (each driven at its largest batch x context and
relaunched, the relaunch placed on its stored profile); then check that every runner carries the
MPS cap it should (read from /proc/PID/environ), that a real runner declared too small fails alone,
and show a 507 and an eviction (or a park); then park and wake, and a defragmenting move where there
are two GPUs (scripts/gpu_check_park.py), and a vLLM tool call where vLLM is installed. With --mps the
server runs the CUDA MPS daemon, and a process joined to it past its cap
(CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, as Shoal sets it for runners) must fail alone while a neighbouring
model keeps answering. Issue 15's figures are checked out loud as GOAL PASS/FAIL/WARN/SKIP lines
(scripts/gpu_check_goals.py). Exits non-zero if a launch fails, a measurement exceeds its
reservation, a goal is missed or the MPS cap does not hold.

There is no network on the GPU machine and no model small enough to carry, so the models are built
here with random weights (a trained-on-the-spot BPE tokenizer, Llama-shaped LLMs, a BERT encoder):
memory behaviour is what is checked, not the text. The wheels for the packages the machine lacks
(scripts/gpu-wheels.txt) are fetched into .whl/ by scripts/gpu-wheels.
"""

from __future__ import annotations

import argparse
import importlib.util
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import gpu_check_park  # noqa: E402  (its sibling: the park/wake and move sections)
from gpu_check_goals import Goals, pct  # noqa: E402

GiB = 1024**3
# GPU_CHECK_DRY=1: rehearse the whole flow on a machine without a GPU, on a declared fake 80 GiB GPU.
DRY_RUN = os.environ.get("GPU_CHECK_DRY") == "1"
WORDS = gpu_check_park.WORDS  # the words the tokenizer is trained on and the prompts are made of


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
        corpus,
        trainers.BpeTrainer(
            vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<tool_call>", "</tool_call>"]
        ),
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
    """GPU 0's use per pid, as Shoal's ledger reads it (shoal.devices: NVML's compute processes and
    its MPS client processes, which NVML lists apart under --mps); {} on fake GPUs."""
    if DRY_RUN:
        return {}
    from shoal.devices import gpu_process_usage

    return {pid: used for (device, pid), used in gpu_process_usage().items() if device == "gpu:0"}


def wait_gone(http: httpx.Client, uid: str) -> None:
    r = http.delete(f"/v1/models/{uid}")
    assert r.status_code == 200, r.text
    time.sleep(1)  # terminate waits for NVML to drop the runner; a breath more for the driver


def profile_round(
    http: httpx.Client, launches: dict[str, dict[str, Any]], failures: list[str], goals: Goals
) -> list[dict]:
    """Estimate error before and after a profile, for each of the three models: its first launch was
    placed by the formula (llm-a, emb) or by the formula corrected by the profiles measured before it
    (llm-b) and then profiled; each is driven at its largest batch x context and its NVML use read
    (goal within 25%), then relaunched, placed on its stored profile, driven again and read (goal
    within 10%)."""
    rows = []
    for uid in ("llm-a", "emb", "llm-b"):
        if "replicas" not in http.get(f"/v1/models/{uid}").json():
            continue  # its launch failed (already a failure)
        first = gpu_check_park.estimate_goal(http, goals, nvml_by_pid, uid, launches[uid])
        wait_gone(http, uid)
        r = http.post("/v1/models", json={**launches[uid], "model_uid": uid, "gpu_idx": [0]})
        if r.status_code != 200:
            failures.append(f"relaunch {uid}: {r.status_code} {r.text[:300]}")
            continue
        again = gpu_check_park.estimate_goal(http, goals, nvml_by_pid, uid, launches[uid])
        rows.append({"uid": uid, "first_launch": first, "relaunch": again})
        print(
            f"{uid:6} first {first['source']:9} {first['estimate'] / GiB:6.2f} GiB vs NVML "
            f"{first['nvml'] / GiB:6.2f} GiB (error {pct(error_of(first))}), profile "
            f"{(first['profile'] or 0) / GiB:6.2f} GiB; relaunch {again['source']:7} "
            f"{again['estimate'] / GiB:6.2f} GiB vs NVML {again['nvml'] / GiB:6.2f} GiB "
            f"(error {pct(error_of(again))})"
        )
        if again["first"] or again["source"] != "profile":
            failures.append(f"{uid} relaunch placed by {again['source']}, not its profile")
    return rows


def error_of(row: dict[str, Any]) -> float | None:
    return (row["estimate"] - row["nvml"]) / row["nvml"] if row["nvml"] else None


def read_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def runner_mps_env(
    http: httpx.Client, data_dir: Path, mps_on: bool, goals: Goals, section: str = "placement"
) -> list[dict[str, Any]]:
    """Every GPU runner's MPS variables, read from /proc/PID/environ: under --mps each carries
    CUDA_MPS_PINNED_DEVICE_MEM_LIMIT equal to the reservation it was started on (in whole MiB, as
    hosts/mps.py writes it) and the daemon's pipe folder; without MPS none carries them."""
    from shoal.hosts.mps import mps_env

    pipe, logs = str(data_dir / "mps" / "pipe"), str(data_dir / "mps" / "log")
    seen, bad = [], []
    for model in http.get("/v1/models").json()["data"]:
        for rep in http.get(f"/v1/models/{model['id']}").json().get("replicas", []):
            if rep["state"] != "ready" or not rep["pid"] or not str(rep["device"]).startswith("gpu"):
                continue
            env = read_environ(rep["pid"])
            devices = len(str(rep["device"]).split(","))
            want = mps_env(pipe, logs, rep["estimate_bytes"], devices) if mps_on else {}
            names = ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_PIPE_DIRECTORY")
            got = {k: env.get(k) for k in names}
            expected = {k: want.get(k) for k in names}
            seen.append({"uid": model["id"], "pid": rep["pid"], "env": got, "expected": expected})
            if got != expected:
                bad.append(f"{model['id']} pid {rep['pid']}: {got}, expected {expected}")
    what = "its reservation as CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" if mps_on else "no MPS variables (MPS off)"
    detail = f"{len(seen)} runners read from /proc/PID/environ, each with {what}"
    goals.check(f"runner MPS env ({section})", bool(seen) and not bad, detail if not bad else "; ".join(bad))
    for row in seen:
        print(f"  {row['uid']:8} pid {row['pid']}: {row['env']['CUDA_MPS_PINNED_DEVICE_MEM_LIMIT']}")
    return seen


MPS_HOG = """
import json, torch
torch.empty(0, device="cuda")  # joins the MPS server with the environment it was given
free, total = torch.cuda.mem_get_info()  # what CUDA reports under the cap (cap_fraction's premise)
held, step = [], 64 * 1024**2
try:
    while True:
        held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError:
    print(json.dumps({"reached": len(held) * step, "cuda_total": total, "cuda_free": free}))
"""


def mps_round(http: httpx.Client, data_dir: Path, goals: Goals) -> dict[str, Any]:
    """A process joined to Shoal's MPS daemon with a 1 GiB cap (the variables Shoal gives its
    runners) allocates until it fails; it must stop within its cap, and llm-b must keep answering.
    It also prints the total CUDA reports under the cap, which is what runners now take their torch
    share of (engines/base.py cap_fraction)."""
    from shoal.hosts.mps import mps_env

    gpu = next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == "gpu:0")
    status = gpu.get("mps") or {}
    on = bool(status.get("enabled"))
    goals.check("MPS on", on, f"--mps asked; MPS {'on' if on else 'off'}: {status.get('reason')}")
    if not on:
        return {"mps": status}
    cap = 1 * GiB
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    env.update(mps_env(str(data_dir / "mps" / "pipe"), str(data_dir / "mps" / "log"), cap, 1))
    hog = subprocess.run(
        [sys.executable, "-c", MPS_HOG], env=env, capture_output=True, text=True, timeout=300
    )
    try:
        seen = json.loads(hog.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        seen = {"reached": 0, "cuda_total": None, "cuda_free": None}
    reached = int(seen["reached"])
    total = seen["cuda_total"]
    log(
        f"MPS hog capped at {cap / GiB:.2f} GiB: CUDA reported total "
        f"{'?' if total is None else f'{total / GiB:.2f} GiB'} (GPU {gpu['total_bytes'] / GiB:.2f} GiB), "
        f"allocated {reached / GiB:.2f} GiB, then rc {hog.returncode}"
    )
    r = http.post("/v1/chat/completions", json={"model": "llm-b", "max_tokens": 8, "messages": [
        {"role": "user", "content": "still there?"}]})  # fmt: skip
    goals.check(
        "MPS hog capped",
        0 < reached <= cap,
        f"a client capped at {cap / GiB:.2f} GiB allocated {reached / GiB:.2f} GiB before failing"
        + ("" if reached else f" ({hog.stderr[-300:]})"),
    )
    goals.check("MPS neighbour", r.status_code == 200, f"llm-b answered {r.status_code} after the hog")
    return {"mps": status, "cap": cap, "hog": seen, "neighbour_status": r.status_code}


def overcap_round(http: httpx.Client, goals: Goals, mps_on: bool) -> dict[str, Any]:
    """A real runner declared smaller than its weights (gc-llm-b, ~1.4 GiB of bf16 weights, in 1 GiB):
    under its cap (torch's share, and under --mps CUDA_MPS_PINNED_DEVICE_MEM_LIMIT too) its load must
    fail with an out-of-memory error in that runner alone, while llm-a, emb and llm-b keep their
    pids and answer."""
    name = "over-cap runner fails alone"
    if DRY_RUN:
        goals.skip(name, "fake GPUs cap nothing (their runners compute on the CPU)")
        return {}
    before = {
        uid: http.get(f"/v1/models/{uid}").json()["replicas"][0]["pid"] for uid in ("llm-a", "emb", "llm-b")
    }
    r = http.post("/v1/models", json={
        "model_name": "gc-llm-b", "model_uid": "overcap", "model_engine": "transformers",
        "gpu_memory": "1GiB", "context_length": 512, "max_batch_size": 1, "gpu_idx": [0],
    })  # fmt: skip
    said = r.text[:600]
    log(f"over-cap launch (1 GiB declared for ~1.4 GiB of weights, MPS {'on' if mps_on else 'off'}): "
        f"{r.status_code} {said}")  # fmt: skip
    http.delete("/v1/models/overcap")
    answers = {uid: gpu_check_park.ask(http, uid)[0] for uid in before}
    after = {uid: http.get(f"/v1/models/{uid}").json()["replicas"][0]["pid"] for uid in before}
    oom = any(word in said.lower() for word in ("out of memory", "outofmemory", "cuda error"))
    why = "out of memory" if oom else "no out-of-memory error named"
    pids = "unchanged" if after == before else f"{before} -> {after}"
    goals.check(
        name,
        r.status_code != 200 and oom and after == before and set(answers.values()) == {200},
        f"its launch answered {r.status_code} ({why}); neighbours answered {answers}, pids {pids}",
    )
    return {"status": r.status_code, "message": said, "neighbours": answers, "pids_kept": after == before}


TOOL_TEMPLATE = (
    "{% if tools %}system: you may call {{ tools | tojson }} as <tool_call>{json}</tool_call>\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}


def vllm_tools_round(http: httpx.Client, goals: Goals) -> dict[str, Any]:
    """Where vLLM is installed: llm-a under the vllm engine with tool_call_parser=hermes (its
    tokenizer has <tool_call> tokens); a named tool_choice must come back as a get_weather call with
    JSON arguments (vLLM constrains the output to the tool's schema, so random weights do too), and
    tool_choice=auto must answer in OpenAI's shape (a random-weight model rarely makes a call)."""
    name = "vLLM tool call"
    if importlib.util.find_spec("vllm") is None:
        goals.skip(name, f"vLLM is not installed in {sys.executable} (GPU-FACTS.md: not on the GPU machine)")
        return {"skipped": "vllm not installed"}
    if DRY_RUN:
        goals.skip(name, "fake GPUs: vLLM needs a real GPU")
        return {"skipped": "fake GPUs"}
    started = time.monotonic()
    r = http.post("/v1/models", json={
        "model_name": "gc-llm-a", "model_uid": "vllm-tools", "model_engine": "vllm", "gpu_idx": [0],
        "context_length": 2048, "max_num_seqs": 4, "enforce_eager": True, "tool_call_parser": "hermes",
        "chat_template": TOOL_TEMPLATE, "start_timeout": 400,
    })  # fmt: skip
    log(f"vLLM launch with tool_call_parser=hermes: {r.status_code} in {time.monotonic() - started:.1f} s")
    if r.status_code != 200:
        goals.check(name, False, f"vLLM launch answered {r.status_code}: {r.text[:500]}")
        return {"launch": r.status_code}
    ask = {"model": "vllm-tools", "max_tokens": 48, "temperature": 0, "tools": [WEATHER],
           "messages": [{"role": "user", "content": "weather in paris?"}]}  # fmt: skip
    named = http.post("/v1/chat/completions", json={
        **ask, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})  # fmt: skip
    auto = http.post("/v1/chat/completions", json={**ask, "tool_choice": "auto"})
    calls = named.json()["choices"][0]["message"].get("tool_calls") if named.status_code == 200 else None
    try:
        call = calls[0]["function"] if calls else {}
        arguments = json.loads(call.get("arguments") or "null")
    except (ValueError, KeyError, TypeError):
        call, arguments = {}, None
    auto_message = auto.json()["choices"][0]["message"] if auto.status_code == 200 else {}
    log(f"vLLM named tool_choice: {named.status_code} {calls}; auto: {auto.status_code} "
        f"{len(auto_message.get('tool_calls') or [])} tool call(s)")  # fmt: skip
    goals.check(
        name,
        call.get("name") == "get_weather" and isinstance(arguments, dict) and "city" in arguments
        and auto.status_code == 200 and "role" in auto_message,
        f"named: {named.status_code} {call.get('name')}({arguments}); auto: {auto.status_code}",
    )  # fmt: skip
    http.delete("/v1/models/vllm-tools")
    return {"named": calls, "auto": auto_message}


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
    goals = Goals(failures, real_gpu=not DRY_RUN)
    machine()
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
            checked = placement(http, failures, goals, root / "data", args.mps)
        park = {
            "park_and_wake": gpu_check_park.park_and_wake(
                http,
                log,
                nvml_by_pid,
                failures,
                goals,
                lambda: runner_mps_env(http, root / "data", args.mps, goals, "park"),
            ),  # fmt: skip
            "move": gpu_check_park.defragment(http, log, nvml_by_pid, failures, goals),
        }
        gpu_check_park.clear(http)
        checked["vllm_tools"] = vllm_tools_round(http, goals)
        (
            Path(os.environ.get("OUT", root)) / f"{os.environ.get('GPU_CHECK_NAME', 'gpu-check')}.json"
        ).write_text(
            json.dumps({**checked, "park": park, "goals": goals.lines, "failures": failures}, indent=2)
        )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        tail = server_log.read_text(errors="replace").splitlines()[-25:]
        print("\n--- server log (tail) ---\n" + "\n".join(tail))
    print(goals.summary())
    print("\nRESULT:", "PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


def machine() -> None:
    """What the lent machine runs (GPU-FACTS.md asks for the driver and kernel versions)."""
    log(f"python {sys.version.split()[0]} at {sys.executable}; kernel {os.uname().release}")
    if DRY_RUN:
        log("GPU_CHECK_DRY=1: fake GPUs, no NVML, no MPS; runners compute on the CPU")
        return
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        smi = f"nvidia-smi: {exc}"
    print("\n".join(smi.splitlines()[:12]), flush=True)
    import torch

    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, vllm installed: "
        f"{importlib.util.find_spec('vllm') is not None}")  # fmt: skip


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


def placement(
    http: httpx.Client, failures: list[str], goals: Goals, data_dir: Path, mps_on: bool
) -> dict[str, Any]:
    """The placement checks: three models on GPU 0 in Xinference's failing order, the estimate error
    before and after a profile, the runners' MPS variables, the MPS cap (with --mps), a runner over
    its cap, the 507, an eviction or a park."""
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
    profiled = profile_round(http, by_uid, failures, goals)
    runner_env = runner_mps_env(http, data_dir, mps_on, goals)
    checked_mps = mps_round(http, data_dir, goals) if mps_on else None
    overcap = overcap_round(http, goals, mps_on)
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
    if r.status_code == 200:  # placed by the formula corrected by the profiles stored so far
        late = gpu_check_park.estimate_goal(
            http, goals, nvml_by_pid, "late", {"context_length": 512, "max_batch_size": 1}
        )
    # llm-a (transformers) parks where host RAM allows: its process stays, its GPU memory goes
    evicted = [uid for uid in old_pids if statuses.get(uid) in ("evicted", "parked")]
    still = nvml_by_pid()
    log(f"evicted or parked: {evicted}; their pids in NVML: {[u for u in evicted if old_pids[u] in still]}")
    if r.status_code != 200 or statuses.get("llm-a") not in ("evicted", "parked"):
        failures.append(f"eviction: late={r.status_code} statuses={statuses}")
    return {"report": report, "profiles": profiled, "runner_mps_env": runner_env, "mps": checked_mps,
            "overcap": overcap, "late": late if r.status_code == 200 else None}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
