"""Admin request bodies, with Xinference's field names so xinference-client works unchanged."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Fields xinference-client always sends; Shoal accepts them and uses what applies to one machine.
XINFERENCE_IGNORED = (
    "peft_model_config",
    "n_worker",
    "worker_ip",
    "replica_config",
    "enable_thinking",
    "enable_virtual_env",
    "virtual_env_packages",
    "virtual_env_find_links",
    "request_limits",
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

    def engine_options(self) -> dict[str, Any]:
        extra = dict(self.model_extra or {})
        for name in XINFERENCE_IGNORED:
            extra.pop(name, None)
        return {k: v for k, v in extra.items() if v is not None}


class RegisterRequest(BaseModel):
    """POST /v1/model_registrations/{type}: `model` is the model JSON (string or object)."""

    model: str | dict[str, Any]
    persist: bool = True
    worker_ip: str | None = None
