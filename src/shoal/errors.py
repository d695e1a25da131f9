"""Shoal's exception tree. One handler in the gateway maps it to HTTP and the OpenAI error shape.

ShoalError                      500  (never raised for anything a client sent)
├── InvalidRequest              400  bad field values, unsupported ability
├── ModelNotFound               404  unknown model uid or catalog name
│   └── HubNotFound             404  a hub repo, revision or file that does not exist (names it)
├── HubAccessDenied             403  a gated or private hub repo this token may not read (HF_TOKEN)
├── HubUnreachable              502  the hub (HF_ENDPOINT) did not answer, and the cache cannot stand in
├── Conflict                    409  a uid already in use
├── ModelUnavailable            503  loading, restarting, or its runner died (Retry-After)
│   └── DevicesUnavailable      503  the device snapshot (NVML, /proc) hangs: no placement now
├── InsufficientMemory          507  no device can hold the model now (the numbers in details)
├── InsufficientDisk            507  the download does not fit on the cache's disk (the numbers)
├── RequestTimeout              504  the runner sent no byte within the deadline
├── LaunchFailed                400  the engine refused the model (its reason in the message)
│   └── NodeLost                400  its Ray node went away (the service places the replica elsewhere)
├── IllegalTransition           500  a replica state change the lifecycle forbids (a Shoal bug)
└── EngineMissing               400  the engine's extra is not installed
"""

from __future__ import annotations


class ShoalError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    replica: int | None = None  # the replica whose runner failed this request: x-shoal-replica

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ShoalError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(ShoalError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(ShoalError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ModelUnavailable(ShoalError):
    status = 503
    type = "server_error"
    code = "model_unavailable"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DevicesUnavailable(ModelUnavailable):
    code = "devices_unavailable"


class InsufficientMemory(ShoalError):
    status = 507
    type = "insufficient_memory"
    code = "no_fit"

    def __init__(self, message: str, details: dict[str, object]) -> None:
        super().__init__(message)
        self.details = details


class RequestTimeout(ShoalError):
    status = 504
    type = "server_error"
    code = "timeout"


class LaunchFailed(ShoalError):
    """The runner could not load the model; message carries the engine's own reason."""

    status = 400
    type = "invalid_request_error"
    code = "launch_failed"


class EngineMissing(InvalidRequest):
    code = "engine_missing"


class NodeLost(LaunchFailed):
    """The node (or its agent) went away: not the model's fault; place the replica elsewhere."""


class IllegalTransition(ShoalError):
    """A replica was asked to move between states its lifecycle does not connect."""


class HubNotFound(ModelNotFound):
    code = "hub_not_found"


class HubAccessDenied(ShoalError):
    status = 403
    type = "permission_error"
    code = "hub_access_denied"


class HubUnreachable(ShoalError):
    status = 502
    type = "server_error"
    code = "hub_unreachable"


class InsufficientDisk(ShoalError):
    status = 507
    type = "insufficient_storage"
    code = "disk_full"
