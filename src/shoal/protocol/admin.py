"""Admin request bodies, with Xinference's field names so xinference-client works unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields xinference-client always sends; Shoal accepts them and uses what applies to one machine.
XINFERENCE_IGNORED = (
    "peft_model_config",
    "n_worker",
    "replica_config",
    "enable_thinking",
    "enable_virtual_env",
    "virtual_env_packages",
    "virtual_env_find_links",
)


class LaunchRequest(BaseModel):
    """POST /v1/models. Fields not listed here are engine keyword arguments (e.g. n_ctx, n_parallel)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_name: str = Field(min_length=1)
    model_uid: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_type: str | None = None
    model_engine: str | None = None
    model_format: str | None = None
    model_size_in_billions: float | int | str | None = None
    quantization: str | None = None
    replica: int = Field(1, ge=1, le=64)
    n_gpu: int | str | None = "auto"
    gpu_idx: int | list[int] | None = None
    model_path: str | None = None
    envs: dict[str, str] | None = None
    # Memory placement (Shoal's own; not engine options):
    gpu_memory: str | int | None = Field(
        None, description='declared memory per device, e.g. "6GiB"; overrides the estimate'
    )
    keep_alive: str | float | None = Field(
        None, description="idle time before it may be evicted: 300, 5m, 1h; -1 never"
    )
    pinned: bool = Field(False, description="never evicted")
    gpu_compute: int | None = Field(
        None, ge=1, le=100, strict=True, description="CUDA MPS only: percent of the GPU's SMs it may use"
    )
    request_limits: int | None = Field(
        None, ge=1, le=100_000, description="requests served at once (Xinference)"
    )
    max_queue: int = Field(
        64, ge=0, le=100_000, description="requests waiting beyond request_limits; then 503"
    )
    queue_timeout: float = Field(
        0, ge=0, le=3600, description="seconds to wait for memory when it does not fit now"
    )
    device: Literal["cpu", "gpu", "auto"] | None = Field(
        None, description="cpu runs on the CPU, like n_gpu=0"
    )
    worker_ip: str | None = Field(
        None, description="Ray cluster: only on this node (its IP, name node-xxxxxxxx or Ray node id)"
    )
    download_hub: str | None = Field(None, description="Xinference's: the hub to download from (huggingface)")

    def engine_options(self) -> dict[str, Any]:
        extra = dict(self.model_extra or {})
        for name in XINFERENCE_IGNORED:
            extra.pop(name, None)
        return {k: v for k, v in extra.items() if v is not None}


class EstimateRequest(BaseModel):
    """POST /v1/models/estimate: a launch body, or Xinference's cal-model-mem fields for a model
    that is not in the catalog (size, format, quantization, context length)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_name: str | None = None
    model_format: str | None = None
    model_size_in_billions: float | int | str | None = None
    quantization: str | None = None
    model_engine: str | None = None
    context_length: int | None = Field(None, ge=1)
    parallel: int | None = Field(None, ge=1, le=1024)
    dtype: str | None = None
    kv_cache_dtype: str | int | None = None
    n_gpu: int | str | None = "auto"
    gpu_idx: int | list[int] | None = None
    device: Literal["cpu", "gpu", "auto"] | None = None
    gpu_memory: str | int | None = None
    replica: int = Field(1, ge=1, le=64)
    worker_ip: str | None = Field(None, description="Ray cluster: where it would go on this node")
    model_type: str | None = None
    download_hub: str | None = None


class PullRequest(BaseModel):
    """POST /v1/cache/models: download a model into the cache (a hub name, or a catalog name
    whose weights come from a hub), streaming progress as NDJSON unless stream is false."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(min_length=1, max_length=1000)
    model_type: str | None = None
    model_format: str | None = None
    quantization: str | None = None
    model_size_in_billions: float | int | str | None = None
    model_engine: str | None = None
    download_hub: str | None = None
    variant: str | None = None  # a diffusers pipeline's weights variant (fp16), as a launch's
    stream: bool = True


class RegisterRequest(BaseModel):
    """POST /v1/model_registrations/{type}: `model` is the model JSON (string or object)."""

    model: str | dict[str, Any]
    persist: bool = True
    worker_ip: str | None = None
