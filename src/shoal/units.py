"""Byte sizes as people write them ("6GiB", "512MB", 1073741824) and as Shoal prints them."""

from __future__ import annotations

import re

GiB = 1024**3
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes from "6GiB", "6 GB", "512MiB" or a plain number of bytes."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return int(value)
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 6GiB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n_bytes: int | float) -> str:
    return f"{n_bytes / GiB:.2f} GiB"


_DURATION = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> float:
    """Seconds from 300, "300", "5m", "1h" or "-1" (negative means forever, as in Ollama)."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 300, 5m, 1h, or -1 for never)")
    return float(match.group(1)) * _SECONDS[match.group(2) or "s"]
