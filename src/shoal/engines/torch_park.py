"""Park and wake for the torch engines: modules to pinned host memory and back, one helper for all.

On the CPU, or on a fake GPU (whose runner computes on the CPU), the weights already live in host
RAM: both are no-ops there, and only the gateway's side (the reservation released, the process kept,
the replica placed again on wake) happens."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any


def park_modules(modules: Iterable[Any], device: str) -> None:
    if device != "cuda":
        return
    import torch

    for module in modules:
        module.to("cpu")
        # pinned pages copy back to the GPU by DMA at full bus speed: the point of a fast wake
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.data = tensor.data.pin_memory()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the caching allocator's blocks go back to the driver


def wake_modules(modules: Iterable[Any], device: str) -> None:
    if device != "cuda":
        return
    import torch

    for module in modules:
        module.to(device, non_blocking=True)
    torch.cuda.synchronize()
