"""From a launch request to what the scheduler needs: which kind of device, how many, how much
memory on each (the estimate, or what the launch declares), and how many CPU cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shoal.catalog import ModelFamily, ModelSpec, Source
from shoal.catalog.estimate import Estimate, ModelShape, RemoteWeights, estimate
from shoal.catalog.resolve import local_path
from shoal.devices import Device
from shoal.engines.base import ESTIMATE_DEFAULTS
from shoal.errors import InvalidRequest
from shoal.units import parse_duration, parse_size


@dataclass(frozen=True)
class LaunchPlan:
    kind: Literal["gpu", "cpu"]
    n_devices: int
    allowed: tuple[str, ...] | None  # gpu_idx: only these devices
    per_device: int  # bytes to reserve on each device
    breakdown: dict[str, Any]  # the estimate, for describe, the devices route and the UI
    cores: int  # CPU cores for a runner that computes on the CPU (CPU or fake-GPU replicas)
    fake: bool  # placed on declared fake GPUs: the runner computes on the CPU

    @property
    def real_gpu(self) -> bool:
        """Placed on NVIDIA GPUs the runner computes on (not the CPU, not declared fake GPUs)."""
        return self.kind == "gpu" and not self.fake


def device_kind(
    n_gpu: int | str | None, gpu_idx: int | list[int] | None, device: str | None, gpus: list[Device]
) -> tuple[Literal["gpu", "cpu"], int, tuple[str, ...] | None]:
    """(kind, devices per replica, allowed device ids) from Xinference's n_gpu / gpu_idx and `device`."""
    present = {d.index for d in gpus}
    if gpu_idx is not None:
        wanted = [gpu_idx] if isinstance(gpu_idx, int) else list(gpu_idx)
        missing = sorted(set(wanted) - present)
        if missing or not wanted:
            raise InvalidRequest(
                f"gpu_idx {missing or wanted} not present; GPUs here: {sorted(present) or 'none'}"
            )
        return "gpu", len(wanted), tuple(f"gpu:{i}" for i in wanted)
    if (
        device == "cpu"
        or n_gpu is None
        or n_gpu == 0
        or (isinstance(n_gpu, str) and n_gpu.lower() in ("0", "cpu"))
    ):
        return "cpu", 1, None
    if isinstance(n_gpu, str) and n_gpu.lower() != "auto":
        if not n_gpu.isdigit():
            raise InvalidRequest(f"n_gpu must be a number, 'auto' or null (CPU), not {n_gpu!r}")
        n_gpu = int(n_gpu)
    if isinstance(n_gpu, int):
        if n_gpu > len(gpus):
            raise InvalidRequest(f"n_gpu={n_gpu} but there are {len(gpus)} GPU(s)")
        return "gpu", n_gpu, None
    if device == "gpu" and not gpus:
        raise InvalidRequest("device=gpu but there is no GPU (set SHOAL_FAKE_GPUS to declare fake ones)")
    return ("gpu", 1, None) if gpus else ("cpu", 1, None)


def estimate_model(
    engine: str,
    family: ModelFamily,
    spec: ModelSpec,
    source: Source,
    options: dict[str, Any],
    on_gpu: bool,
    context_length: int | None = None,
    parallel: int | None = None,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
    remote: RemoteWeights | None = None,
) -> Estimate:
    defaults = ESTIMATE_DEFAULTS.get(engine, ESTIMATE_DEFAULTS["transformers"])
    context = context_length or options.get(defaults["context_option"] or "", None) or defaults["context"]
    if family.context_length:
        context = min(int(context), family.context_length)
    parallel = parallel or options.get(defaults["parallel_option"] or "", None) or defaults["parallel"]
    path: Path | None = local_path(source)
    size = spec.model_size_in_billions
    arch = spec.architecture
    shape = (
        ModelShape(
            arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.hidden_size, arch.vocab_size,
            arch.n_params, family.context_length, "catalog",
        )
        if arch is not None
        else None
    )  # fmt: skip
    return estimate(
        model_format=spec.model_format,
        engine=engine,
        path=path,
        size_in_billions=float(size) if isinstance(size, int | float) else None,
        quantization=spec.quantization,
        context_length=int(context),
        parallel=int(parallel),
        dtype=dtype or options.get("dtype") or options.get("torch_dtype"),
        kv_cache_dtype=kv_cache_dtype,
        on_gpu=on_gpu,
        remote=remote if path is None else None,
        catalog_shape=shape,
    )


def plan_launch(
    request: Any,
    engine: str,
    family: ModelFamily,
    spec: ModelSpec,
    source: Source,
    devices: list[Device],
    default_cores: int,
    options: dict[str, Any],
    remote: RemoteWeights | None = None,
) -> LaunchPlan:
    """`request` is a LaunchRequest or an EstimateRequest (both carry the placement fields);
    `remote` is what the hub says of weights not downloaded yet."""
    gpus = [d for d in devices if d.kind == "gpu"]
    kind, n_devices, allowed = device_kind(request.n_gpu, request.gpu_idx, request.device, gpus)
    est = estimate_model(
        engine,
        family,
        spec,
        source,
        options,
        on_gpu=kind == "gpu",
        context_length=getattr(request, "context_length", None),
        parallel=getattr(request, "parallel", None),
        dtype=getattr(request, "dtype", None),
        kv_cache_dtype=getattr(request, "kv_cache_dtype", None),
        remote=remote,
    )
    runtime = 0 if kind == "gpu" else ESTIMATE_DEFAULTS.get(engine, {}).get("cpu_runtime_bytes", 0)
    # Engines that split a model put 1/N of it on each GPU; every process pays its own CUDA context.
    per_device = (est.total - est.cuda_context) // n_devices + est.cuda_context + runtime
    breakdown = {**est.to_dict(), "cpu_runtime": runtime, "per_device": per_device,
                 "formula_per_device": per_device, "declared": None}  # fmt: skip
    if request.gpu_memory is not None:
        try:
            per_device = parse_size(request.gpu_memory)
        except ValueError as exc:
            raise InvalidRequest(f"gpu_memory: {exc}") from exc
        breakdown["declared"] = per_device
        breakdown["per_device"] = per_device
    fake = kind == "gpu" and all(d.fake for d in gpus)
    computes_on_cpu = kind == "cpu" or fake
    cores = int(options.get("n_threads") or default_cores) if computes_on_cpu else 0
    return LaunchPlan(kind, n_devices, allowed, per_device, breakdown, cores, fake)


def keep_alive_seconds(value: str | float | None, default: float) -> float:
    if value is None:
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(f"keep_alive: {exc}") from exc
