"""The `shoal` command line. Every command but `serve` talks to the REST API at --endpoint."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from shoal import settings
from shoal.client import Client, ShoalAPIError

app = typer.Typer(help="Shoal: one server for every model kind, behind the OpenAI API.", no_args_is_help=True)
console = Console()
Endpoint = Annotated[
    str, typer.Option("--endpoint", "-e", envvar=settings.ENDPOINT.env, help=settings.ENDPOINT.help)
]


def _client(endpoint: str) -> Client:
    return Client(endpoint)


def _fail(exc: ShoalAPIError) -> typer.Exit:
    console.print(f"[red]error {exc.status}:[/red] {exc.message}")
    return typer.Exit(1)


@contextlib.contextmanager
def _session(endpoint: str) -> Iterator[Client]:
    """A client to the server whose API errors end the command with the server's message."""
    with _client(endpoint) as client:
        try:
            yield client
        except ShoalAPIError as exc:
            raise _fail(exc) from exc


def _settings_epilog() -> str:
    """Every environment setting with its default, from settings.ALL (typer joins lines that one
    newline parts: each entry is its own paragraph)."""
    entries = [f"{s.env} ({s.default or 'unset'}): {s.help}" for s in settings.ALL]
    return "\n\n".join(
        [
            "Environment settings, each with its default (a flag above reads its setting and wins "
            "over it). Numbers are checked at start: a value that is not one, or out of bounds (a "
            "timeout of 0 or less), ends the server with one line naming the setting.",
            *entries,
        ]
    )


@app.command(epilog=_settings_epilog())
def serve(
    host: Annotated[
        str, typer.Option(envvar=settings.HOST.env, help=settings.HOST.help)
    ] = settings.HOST.default,
    port: Annotated[int, typer.Option(envvar=settings.PORT.env, help=settings.PORT.help)] = int(
        settings.PORT.default
    ),
    data_dir: Annotated[Path, typer.Option(envvar=settings.DATA_DIR.env, help=settings.DATA_DIR.help)] = Path(
        settings.DATA_DIR.default
    ),
    launch: Annotated[
        list[str] | None, typer.Option(help="catalog model to launch at start (repeatable)")
    ] = None,
    log_level: Annotated[
        str, typer.Option(envvar=settings.LOG_LEVEL.env, help=settings.LOG_LEVEL.help)
    ] = "info",
    fake_gpus: Annotated[str, typer.Option(envvar=settings.FAKE_GPUS.env, help=settings.FAKE_GPUS.help)] = "",
    placement: Annotated[
        str, typer.Option(envvar=settings.PLACEMENT.env, help=settings.PLACEMENT.help)
    ] = settings.PLACEMENT.default,
    headroom: Annotated[
        float, typer.Option(envvar=settings.HEADROOM.env, help=settings.HEADROOM.help)
    ] = float(settings.HEADROOM.default),
    autoload: Annotated[bool, typer.Option(help=settings.AUTOLOAD.help)] = False,
    api_key: Annotated[str, typer.Option(envvar=settings.API_KEY.env, help=settings.API_KEY.help)] = "",
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback host without any API key")] = False,
    ray_address: Annotated[
        str, typer.Option(envvar=settings.RAY_ADDRESS.env, help=settings.RAY_ADDRESS.help)
    ] = "",
    warm_spares: Annotated[
        str, typer.Option(envvar=settings.WARM_SPARES.env, help=settings.WARM_SPARES.help)
    ] = settings.WARM_SPARES.default,
    mps: Annotated[
        bool,
        typer.Option(
            help=settings.MPS.help + " (where MPS cannot run, the server says why and serves without it)"
        ),
    ] = False,
    profile: Annotated[
        str, typer.Option(envvar=settings.PROFILE.env, help=settings.PROFILE.help)
    ] = settings.PROFILE.default,
    profile_margin: Annotated[
        float, typer.Option(envvar=settings.PROFILE_MARGIN.env, help=settings.PROFILE_MARGIN.help)
    ] = float(settings.PROFILE_MARGIN.default),
) -> None:
    """Start the server (gateway) in the foreground."""
    import logging

    from shoal.gateway import server
    from shoal.gateway.app import build_app
    from shoal.settings import ServerSettings, SettingError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request is noise
    if placement not in ("binpack", "spread"):
        raise typer.BadParameter("placement must be binpack or spread")
    from shoal.hosts.spares import parse_families

    try:
        parse_families(warm_spares)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--warm-spares") from None
    if profile.lower() not in ("gpu", "all", "off"):
        raise typer.BadParameter("profile must be gpu, all or off")
    try:
        server_settings = ServerSettings(
            host=host,
            port=port,
            data_dir=data_dir,
            fake_gpus=fake_gpus,
            placement=placement,
            headroom=headroom,
            autoload=autoload or settings.AUTOLOAD.on(),
            api_key=api_key or None,
            ray_address=ray_address or None,
            warm_spares=warm_spares,
            mps=mps or settings.MPS.on(),
            profile=profile.lower(),
            profile_margin=profile_margin,
        )
    except SettingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from shoal.state import StateStore

    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and not api_key and not StateStore(data_dir / "shoal.db").keys() and not insecure:
        console.print(
            f"[red]refusing to listen on {host} without auth[/red]: pass --api-key (or create keys "
            "with `shoal keys create`), or --insecure to serve without one"
        )
        raise typer.Exit(2)
    server.serve(build_app(server_settings, launch or []), server_settings, log_level)


@app.command()
def launch(
    name: Annotated[
        str,
        typer.Argument(help="catalog name, or hf.co/ORG/REPO[:QUANT] or modelscope.cn/... (docs/models.md)"),
    ],
    endpoint: Endpoint = settings.ENDPOINT.default,
    uid: Annotated[str | None, typer.Option("--uid", help="model uid (default: the model name)")] = None,
    size_in_billions: Annotated[
        str | None, typer.Option("--size-in-billions", "-s", help="which spec of a catalog family")
    ] = None,
    model_format: Annotated[str | None, typer.Option("--model-format", "-f", help="which spec")] = None,
    quantization: Annotated[str | None, typer.Option("--quantization", "-q", help="which spec")] = None,
    download_hub: Annotated[
        str | None, typer.Option("--download-hub", help="huggingface or modelscope, where a spec names both")
    ] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="llama.cpp or sentence_transformers")] = None,
    replica: Annotated[int, typer.Option(help="number of replicas")] = 1,
    n_gpu: Annotated[
        str, typer.Option("--n-gpu", help="GPUs per replica: auto, 0 (CPU) or a number")
    ] = "auto",
    gpu_idx: Annotated[list[int] | None, typer.Option("--gpu-idx", help="pin to these GPU indices")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="engine option KEY=VALUE")
    ] = None,
    gpu_memory: Annotated[str | None, typer.Option("--gpu-memory", help="declared memory, e.g. 6GiB")] = None,
    keep_alive: Annotated[
        str | None, typer.Option("--keep-alive", help="idle time before eviction: 5m, -1")
    ] = None,
    pinned: Annotated[bool, typer.Option("--pinned", help="never evict this model")] = False,
    queue_timeout: Annotated[float, typer.Option("--queue-timeout", help="seconds to wait for memory")] = 0,
    gpu_compute: Annotated[
        int | None,
        typer.Option("--gpu-compute", help="CUDA MPS only: percent (1-100) of the GPU's SMs it may use"),
    ] = None,
    worker_ip: Annotated[
        str | None,
        typer.Option("--worker-ip", help="Ray cluster: only this node (its IP, name or Ray node id)"),
    ] = None,
) -> None:
    """Launch a model and wait until it is ready, showing progress."""
    options: dict[str, Any] = {
        "worker_ip": worker_ip,
        "gpu_memory": gpu_memory,
        "keep_alive": keep_alive,
        "pinned": pinned,
        "queue_timeout": queue_timeout,
        **{
            k: v
            for k, v in {
                "model_size_in_billions": size_in_billions,
                "model_format": model_format,
                "quantization": quantization,
                "download_hub": download_hub,
            }.items()
            if v is not None
        },
        "gpu_compute": gpu_compute,
    }
    for item in option or []:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    with _session(endpoint) as client:
        model_uid = client.launch(
            name,
            model_uid=uid,
            model_engine=engine,
            replica=replica,
            n_gpu=None if n_gpu == "0" else n_gpu,
            gpu_idx=gpu_idx,
            wait_ready=False,
            **options,
        )
        state = _show_download(client, model_uid)
        start = time.monotonic()
        with console.status(f"loading {model_uid}...") as status:
            while (state := client.describe(model_uid))["status"] == "loading":
                status.update(f"loading {model_uid}... {time.monotonic() - start:.0f} s{_copies(state)}")
                time.sleep(0.2)
    if state["status"] != "ready":
        errors = "; ".join(r["last_error"] or "" for r in state["replicas"])
        console.print(f"[red]{model_uid} failed to load:[/red] {errors}")
        raise typer.Exit(1)
    console.print(f"[green]{model_uid}[/green] ready in {time.monotonic() - start:.1f} s")


def _copies(state: dict[str, Any]) -> str:
    """Ray: the model's files on their way to the nodes its replicas are placed on (downloaded
    there from the hub, or copied from the gateway)."""
    shown = []
    for replica in state.get("replicas", []):
        files = replica.get("files") or {}
        going = {"copying": "copying to", "downloading": "downloading on"}.get(files.get("status", ""))
        if going and files.get("total_bytes"):
            rate = f", {files['rate_bytes_per_s'] / 2**20:.0f} MiB/s" if files.get("rate_bytes_per_s") else ""
            percent = 100 * files["completed_bytes"] // files["total_bytes"]
            shown.append(f"{going} {files['node']}: {percent}%{rate}")
    return f" ({'; '.join(shown)})" if shown else ""


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _show_download(client: Client, uid: str) -> dict[str, Any]:
    """While the model's files download: a progress bar from GET /v1/models/{uid}."""
    state = client.describe(uid)
    if state["status"] != "downloading":
        return state
    with _progress_bar() as bar:
        download = state.get("download") or {}
        task = bar.add_task(f"downloading {download.get('name', uid)}", total=download.get("total_bytes"))
        while state["status"] == "downloading":
            download = state.get("download") or {}
            bar.update(task, completed=download.get("completed_bytes", 0), total=download.get("total_bytes"))
            time.sleep(0.5)
            state = client.describe(uid)
        download = state.get("download") or {}
        bar.update(task, completed=download.get("completed_bytes", 0))
    return state


@app.command()
def pull(
    name: Annotated[
        str,
        typer.Argument(
            help="hf.co/ORG/REPO[:QUANT], hf.co/ORG/REPO/FILE.gguf, modelscope.cn/..., or a catalog name"
        ),
    ],
    endpoint: Endpoint = settings.ENDPOINT.default,
    model_type: Annotated[
        str | None,
        typer.Option("--type", help="LLM, embedding, rerank, audio or image (default: from the repo)"),
    ] = None,
) -> None:
    """Download a model into the server's cache (SHOAL_MODEL_CACHE) without launching it."""
    fields = {"model_type": model_type} if model_type else {}
    last: dict[str, Any] = {}
    with _session(endpoint) as client, _progress_bar() as bar:
        task = bar.add_task(f"pulling {name}", total=None)
        for event in client.pull(name, **fields):
            bar.update(task, completed=event.get("completed_bytes", 0), total=event.get("total_bytes"))
            last = event
    console.print(
        f"[green]{last.get('name', name)}[/green] is in the cache"
        + (f" ({last['detail']})" if last.get("detail") else "")
    )


@app.command()
def cached(endpoint: Endpoint = settings.ENDPOINT.default) -> None:
    """List the models in the server's cache: size, hub, revision, last use, the uids using them."""
    with _session(endpoint) as client:
        entries = client.cached()
    table = Table("NAME", "HUB", "REVISION", "SIZE GiB", "LAST USED", "USED BY")
    for e in entries:
        last = time.strftime("%F %T", time.localtime(e["last_used"])) if e.get("last_used") else "-"
        partial = f" (+{_gib(e['incomplete_bytes'])} partial)" if e.get("incomplete_bytes") else ""
        table.add_row(e["name"], e["hub"], (e.get("revision") or "-")[:12], _gib(e["size_bytes"]) + partial,
                      last, ",".join(e["model_uids"]) or "-")  # fmt: skip
    console.print(table)


@app.command("rm-cache")
def rm_cache(
    name: Annotated[
        str, typer.Argument(help="hf.co/ORG/REPO or modelscope.cn/ORG/REPO, as `shoal cached` lists it")
    ],
    endpoint: Endpoint = settings.ENDPOINT.default,
) -> None:
    """Remove a model's files from the server's cache, and on a Ray cluster from each node's
    (refused while a model uses them)."""
    with _session(endpoint) as client:
        removed = client.remove_cached(name)
    console.print(f"removed {removed.get('name', name)}")
    gateway = removed.get("gateway") or {}
    if removed.get("nodes"):
        console.print(f"  gateway: {gateway.get('status', 'removed')}")
    for node in removed.get("nodes") or []:
        size = f" ({_gib(node['bytes'])} GiB)" if node.get("status") == "removed" else ""
        console.print(f"  {node['node']}: {node['status']}{size}")


@app.command()
def ps(endpoint: Endpoint = settings.ENDPOINT.default) -> None:
    """List running models and their replicas."""
    with _session(endpoint) as client:
        models = client.list_models()
    console.print(models_table(models))


def models_table(models: list[dict[str, Any]]) -> Table:
    """`shoal ps`: one row per model, whatever state its replicas are in (no device, no pid yet); a
    LAST WAKE column once some replica has been woken from parked."""
    woke = any(r.get("last_wake_seconds") is not None for m in models for r in m.get("replicas") or [])
    columns = ["UID", "NAME", "TYPE", "ENGINE", "STATUS", "REPLICAS", "DEVICE", "PIDS"]
    table = Table(*columns, *(["LAST WAKE"] if woke else []))
    for m in models:
        replicas = m.get("replicas") or []
        row = [
            str(m.get("id") or m.get("model_uid") or "-"),
            str(m.get("model_name") or "-"),
            str(m.get("model_type") or "-"),
            str(m.get("model_engine") or "-"),
            str(m.get("status") or "-"),
            str(m.get("replica", len(replicas))),
            ",".join(sorted({_where(r) for r in replicas})) or "-",
            ",".join(str(r.get("pid") or "-") for r in replicas) or "-",
        ]
        if woke:
            row.append(",".join(_wake(r) for r in replicas if r.get("last_wake_seconds") is not None) or "-")
        table.add_row(*row)
    return table


def _where(replica: dict[str, Any]) -> str:
    """Its device; a parked replica's weights are in host RAM, its process on the GPU it left."""
    if replica.get("state") == "parked":
        return f"RAM (from {replica.get('parked_from') or '-'})"
    return str(replica.get("device") or "-")


def _wake(replica: dict[str, Any]) -> str:
    """ "0.21 s, 14:02:07": how long its last wake took, and when."""
    seconds, when = replica.get("last_wake_seconds"), replica.get("last_woken")
    at = time.strftime("%H:%M:%S", time.localtime(when)) if isinstance(when, int | float) else "-"
    return f"{seconds:.2f} s at {at}" if isinstance(seconds, int | float) else "-"


@app.command()
def stop(
    uid: Annotated[str, typer.Argument(help="model uid")], endpoint: Endpoint = settings.ENDPOINT.default
) -> None:
    """Terminate a running model (all its replicas)."""
    with _session(endpoint) as client:
        client.terminate(uid)
    console.print(f"stopped {uid}")


def _gib(n: object) -> str:
    return f"{int(n) / 1024**3:.2f}" if isinstance(n, int | float) else "-"


@dataclass
class NodeGroup:
    """One cluster node on `shoal gpus`: its IP, whether it is up, and its devices as (local id, device)."""

    node: str
    worker_ip: str | None
    alive: bool
    devices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def state(self) -> str:
        return "up" if self.alive else "down"

    @property
    def empty_note(self) -> str:
        """What a node without devices shows in place of them."""
        return "no devices" if self.alive else "left the cluster"


def group_by_node(devices: list[dict[str, Any]], workers: list[dict[str, Any]]) -> list[NodeGroup] | None:
    """GET /v1/cluster/devices grouped by the node in GET /v1/workers, in the workers' order; a device
    is labelled by its id on its node ("gpu:0"). None on one machine, where no device names a node and
    the only worker is "local" (no Ray node id). A node that left the cluster keeps a group without
    devices; a device whose node is not (yet) among the workers gets a group of its own."""
    if not any(d.get("node") for d in devices) and not any(w.get("node_id") for w in workers):
        return None
    groups = {
        w["node"]: NodeGroup(w["node"], w.get("worker_ip"), bool(w.get("alive", True)))
        for w in workers
        if w.get("node")
    }
    for d in devices:
        node = d.get("node") or "?"
        group = groups.setdefault(node, NodeGroup(node, None, True))
        prefix = node + "/"
        group.devices.append((d["id"].removeprefix(prefix), d))
    return list(groups.values())


def _memory_sides(m: dict[str, Any]) -> str:
    """Beside a replica's reservation: its estimate (with what it came from) when that is not simply
    the reservation, its own profile and its measured use."""
    source = (m.get("breakdown") or {}).get("memory_source")
    parts = []
    plain = source in (None, "formula", "declared") and m.get("estimate_bytes") == m.get("reserved_bytes")
    if m.get("estimate_bytes") is not None and not plain:
        parts.append(f"estimate {_gib(m['estimate_bytes'])}" + (f" {source}" if source else ""))
    if m.get("profile_bytes"):
        parts.append(f"profile {_gib(m['profile_bytes'])}")
    if m.get("measured_bytes"):
        parts.append(f"measured {_gib(m['measured_bytes'])}")
    return " (" + ", ".join(parts) + ")" if parts else ""


def mps_line(devices: list[dict[str, Any]]) -> str | None:
    """`shoal gpus`' line on CUDA MPS, when it was asked for or the server has GPUs (real or fake)."""
    mps = next((d["mps"] for d in devices if d.get("mps")), None)
    has_gpu = any(d.get("kind") == "gpu" for d in devices)
    if mps is None or not (has_gpu or mps.get("requested")):
        return None
    return "CUDA MPS: " + ("on" if mps["enabled"] else "off") + f" ({mps['reason']})"


def _device_cells(d: dict[str, Any]) -> list[str]:
    held = [
        f"{m['model_uid']}/{m['index']} {_gib(m['reserved_bytes'])}" + _memory_sides(m)
        + (" [red]OVER[/red]" if m.get("over_reservation") else "")
        for m in d["models"]
    ]  # fmt: skip
    name = d["name"] + (" (fake)" if d.get("fake") else "")
    return [
        name,
        _gib(d["total_bytes"]),
        _gib(d["used_by_others_bytes"]),
        _gib(d["reserved_bytes"]),
        _gib(d["free_bytes"]),
        "\n".join(held) or "-",
    ]


def devices_table(devices: list[dict[str, Any]], workers: list[dict[str, Any]]) -> Table:
    """The `shoal gpus` table: one row per device; on a Ray cluster a NODE column (name, IP, up or
    down) and one section per node, each device named by its id on that node."""
    columns = ["DEVICE", "NAME", "TOTAL GiB", "OTHERS GiB", "RESERVED GiB", "FREE GiB", "MODELS"]
    groups = group_by_node(devices, workers)
    if groups is None:
        table = Table(*columns)
        for d in devices:
            table.add_row(d["id"], *_device_cells(d))
        return table
    table = Table("NODE", *columns)
    for group in groups:
        state = group.state if group.alive else f"[red]{group.state}[/red]"
        node = f"{group.node}\n{group.worker_ip or '-'} {state}"
        if not group.devices:
            note = group.empty_note if group.alive else f"[red]{group.empty_note}[/red]"
            table.add_row(node, "-", note, *["-"] * (len(columns) - 2))
        for i, (local_id, d) in enumerate(group.devices):
            table.add_row(node if i == 0 else "", local_id, *_device_cells(d))
        table.add_section()
    return table


@app.command()
def gpus(endpoint: Endpoint = settings.ENDPOINT.default) -> None:
    """Show each device's memory: total, used by others, each model's reservation and use, free;
    grouped by node on a Ray cluster."""
    with _session(endpoint) as client:
        devices = client.devices()
        workers = client.workers()
    console.print(devices_table(devices, workers))
    if (line := mps_line(devices)) is not None:
        console.print(line)


def profile_line(est: dict[str, Any]) -> str:
    """What `shoal estimate` says of measured profiles: the stored one (used, or stale), the
    correction learned from similar models, or that there is none."""
    profile = est.get("profile")
    if profile is not None:
        state = "stale (library versions changed), not used" if profile["stale"] else "used"
        return (
            f"measured profile on {profile['device_model']}: peak {_gib(profile['peak_bytes'])} GiB, "
            f"reserved {_gib(profile['reserved_bytes'])} GiB ({state})"
        )
    if est.get("correction") is not None:
        return f"no profile yet; formula × {est['correction']} learned from similar models' profiles"
    return "no measured profile yet: the formula places it"


@app.command()
def estimate(
    name: Annotated[str, typer.Argument(help="catalog name, hf.co/ORG/REPO[:QUANT] or modelscope.cn/...")],
    endpoint: Endpoint = settings.ENDPOINT.default,
    context_length: Annotated[
        int | None, typer.Option("--context-length", "-c", help="tokens per sequence")
    ] = None,
    parallel: Annotated[int | None, typer.Option("--parallel", "-p", help="sequences at once")] = None,
    dtype: Annotated[str | None, typer.Option(help="weights dtype: float16, bfloat16, float32")] = None,
    quantization: Annotated[str | None, typer.Option("--quantization", "-q", help="which spec")] = None,
    model_format: Annotated[str | None, typer.Option("--model-format", "-f", help="which spec")] = None,
    size_in_billions: Annotated[
        str | None, typer.Option("--size-in-billions", "-s", help="which spec")
    ] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option("--kv-cache-dtype", help="16, 8, fp16, q8_0")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="engine (default: by format)")] = None,
    n_gpu: Annotated[str, typer.Option("--n-gpu", help="auto, 0 (CPU) or a number")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON answer")] = False,
) -> None:
    """Estimate a model's memory (Xinference's cal-model-mem options work) and where it would go."""
    body = {
        "model_name": name,
        "context_length": context_length,
        "parallel": parallel,
        "dtype": dtype,
        "quantization": quantization,
        "model_format": model_format,
        "model_size_in_billions": size_in_billions,
        "kv_cache_dtype": kv_cache_dtype,
        "model_engine": engine,
        "n_gpu": None if n_gpu == "0" else n_gpu,
    }
    with _session(endpoint) as client:
        result = client.estimate({k: v for k, v in body.items() if v is not None or k == "n_gpu"})
    if as_json:
        console.print_json(json.dumps(result))
        return
    est = result["estimate"]
    table = Table(
        "PART", "GiB", title=f"{result['model_name']} ({result['model_engine']}, {result['device_kind']})"
    )
    for part in ("weights", "kv_cache", "activations", "cuda_context", "cpu_runtime"):
        table.add_row(part, _gib(est.get(part, 0)))
    if est.get("formula_per_device") is not None and est.get("memory_source") != "formula":
        table.add_row("formula per device", _gib(est["formula_per_device"]))
    table.add_row(f"[bold]per device[/bold] ({est.get('memory_source', 'formula')})", _gib(est["per_device"]))
    console.print(table)
    console.print(profile_line(est))
    console.print(
        f"context {est.get('context_length')} × {est.get('parallel')} sequences, dtype {est.get('dtype')}"
    )
    download = result.get("download")
    if download:
        state = "in the cache" if download["cached"] else f"{_gib(download['missing_bytes'])} GiB to download"
        console.print(
            f"{download['name']} at {download['revision'][:12]}: {state} (read from the hub's metadata)"
        )
    where = result["placement"]
    if where["fits"]:
        evict = f", after evicting {', '.join(where['evict'])}" if where.get("evict") else ""
        console.print(f"[green]fits[/green] on {', '.join(where['devices'])}{evict}")
    else:
        console.print(f"[red]does not fit:[/red] {where['reason']}")


@app.command()
def models(
    endpoint: Endpoint = settings.ENDPOINT.default,
    model_type: Annotated[
        str, typer.Option("--type", help="LLM, embedding, rerank, audio, image, or all")
    ] = "LLM",
    search: Annotated[
        str | None,
        typer.Option(
            "--search",
            "-S",
            help="only models whose name, family, description, abilities or licence hold every word",
        ),
    ] = None,
) -> None:
    """List the catalog: built-in and registered models."""
    with _session(endpoint) as client:
        families = client.registrations(model_type, detailed=True, search=search)
    console.print(catalog_table(families))


def catalog_table(families: list[dict[str, Any]]) -> Table:
    """`shoal models`: one row per family, its sizes and formats, abilities, context and licence."""
    table = Table("NAME", "TYPE", "ABILITY", "SIZES (B)", "FORMATS", "CONTEXT", "LICENCE", "BUILT-IN")
    for f in families:
        specs = f.get("model_specs") or []
        formats = ", ".join(sorted({f"{s['model_format']}/{s['quantization']}" for s in specs}))
        sizes = ", ".join(dict.fromkeys(_size(s.get("model_size_in_billions")) for s in specs))
        table.add_row(
            f["model_name"],
            f["model_type"],
            ",".join(f["model_ability"]),
            sizes or "-",
            formats,
            str(f.get("context_length") or "-"),
            str(f.get("license") or "-"),
            "yes" if f["is_builtin"] else "no",
        )
    return table


def _size(size: Any) -> str:
    if isinstance(size, int | float) and not isinstance(size, bool):
        return f"{size:g}"
    return str(size) if size is not None else "-"


@app.command()
def register(
    file: Annotated[Path, typer.Argument(help="model JSON (Xinference format; specs may use model_uri)")],
    endpoint: Endpoint = settings.ENDPOINT.default,
    model_type: Annotated[
        str | None, typer.Option("--type", help="LLM or embedding (default: from file)")
    ] = None,
) -> None:
    """Register a custom model from a local path."""
    data = json.loads(file.read_text())
    with _session(endpoint) as client:
        name = client.register(model_type or data.get("model_type", "LLM"), data)
    console.print(f"registered {name}")


@app.command()
def chat(
    uid: Annotated[str, typer.Argument(help="model uid")],
    endpoint: Endpoint = settings.ENDPOINT.default,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 512,
) -> None:
    """Chat with a model interactively, streaming answers (Ctrl-D to quit)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    with _client(endpoint) as client:
        handle = client.model(uid)
        while True:
            try:
                prompt = console.input("[bold]you> [/bold]")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            messages.append({"role": "user", "content": prompt})
            answer = []
            try:
                for event in handle.chat_stream(messages, max_tokens=max_tokens):
                    for choice in event.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        answer.append(piece)
                        console.print(piece, end="", markup=False, highlight=False)
            except ShoalAPIError as exc:
                raise _fail(exc) from exc
            console.print()
            messages.append({"role": "assistant", "content": "".join(answer)})


keys_app = typer.Typer(help="API keys, kept hashed in the server's data dir (SQLite).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
DataDir = Annotated[Path, typer.Option(envvar=settings.DATA_DIR.env, help=settings.DATA_DIR.help)]


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        str, typer.Option(help="inference (/v1 inference routes) or admin (also launch, stop, register)")
    ],
    name: Annotated[str | None, typer.Option(help="a label for the key")] = None,
    data_dir: DataDir = Path(settings.DATA_DIR.default),
) -> None:
    """Create a key; its secret is printed once, only its hash is stored. Auth turns on with the first key."""
    from shoal.state import StateStore

    try:
        key, secret = StateStore(data_dir / "shoal.db").create_key(scope, name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"key {key.id} ({key.scope}): [bold]{secret}[/bold]")


@keys_app.command("list")
def keys_list(data_dir: DataDir = Path(settings.DATA_DIR.default)) -> None:
    """List keys (ids and scopes; secrets are not kept)."""
    from shoal.state import StateStore

    table = Table("ID", "SCOPE", "NAME", "CREATED")
    for key in StateStore(data_dir / "shoal.db").keys():
        table.add_row(key.id, key.scope, key.name or "", time.strftime("%F %T", time.localtime(key.created)))
    console.print(table)


@keys_app.command("delete")
def keys_delete(
    key_id: Annotated[str, typer.Argument(help="key id")], data_dir: DataDir = Path(settings.DATA_DIR.default)
) -> None:
    """Revoke a key."""
    from shoal.state import StateStore

    if not StateStore(data_dir / "shoal.db").delete_key(key_id):
        console.print(f"[red]no key {key_id}[/red]")
        raise typer.Exit(1)
    console.print(f"deleted {key_id}")


if __name__ == "__main__":
    app()
