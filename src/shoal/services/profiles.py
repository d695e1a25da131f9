"""Measured memory profiles: what a replica really used, kept to place the next launch of the same thing.

After a replica loads, its runner drives one profile run (Engine.profile_run: the launch's largest
batch × context) before it reports ready; Shoal then reads the peak use of the runner's processes
(Snapshot.peak: NVML per pid on a GPU, the RSS high-water mark on the CPU). The reservation becomes
peak × (1 + margin), and the profile is stored in SQLite under a key of the model, engine, the
settings that change memory, the device model (GPU name, "cpu", "fake GPU") and the replica's GPUs.
The engine's library versions are kept beside it: a profile measured under other versions is stale
and not used.

A later launch of the same key is placed on its profile instead of the formula. A first launch uses
the formula corrected by the median measured/formula ratio of the fresh profiles of the same engine
on the same device model (bounded, so one odd model cannot swing it far).

Pure functions over values first; `ProfileBook` (at the bottom) reads and writes the store.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from shoal.catalog import ModelFamily, ModelSpec, Source
from shoal.devices import Device, Snapshot
from shoal.engines.base import ESTIMATE_DEFAULTS
from shoal.services.plan import LaunchPlan
from shoal.state import StateStore, StoredProfile

MODES = ("gpu", "all", "off")
CORRECTION_BOUNDS = (0.5, 1.5)  # a first launch's formula is scaled by no less and no more than this
# Launch options that do not change memory (or enter the key resolved, from the estimate).
NOT_MEMORY = frozenset(
    {"memory_fraction", "n_threads", "gpu_compute", "context_length", "parallel", "dtype", "torch_dtype",
     "kv_cache_dtype"}
)  # fmt: skip
# The libraries whose versions make a profile stale, per engine (PyPI names).
TORCH = ("torch", "transformers")
ENGINE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("xllamacpp",),
    "llm_rerank": ("xllamacpp",),
    "sentence_transformers": ("sentence-transformers", *TORCH),
    "cross_encoder": ("sentence-transformers", *TORCH),
    "embedding_rerank": ("sentence-transformers", *TORCH),
    "transformers": TORCH,
    "vllm": ("vllm", *TORCH),
    "diffusers": ("diffusers", *TORCH),
    "faster_whisper": ("faster-whisper", "ctranslate2"),
    "piper": ("piper-tts", "onnxruntime"),
    "hibari": ("hibari-tts",),
    "rapidocr": ("rapidocr-onnxruntime", "onnxruntime"),
}


def library_versions(engine: str) -> dict[str, str]:
    versions = {}
    for name in ENGINE_LIBRARIES.get(engine, TORCH):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def device_model(plan: LaunchPlan, devices: Sequence[Device]) -> str | None:
    """What a profile of this launch is measured on: "cpu", "fake GPU", or the GPUs' name when every
    GPU it may go on has the same one (else None: no profile is looked up, the formula places it)."""
    if plan.kind == "cpu":
        return "cpu"
    if plan.fake:
        return "fake GPU"
    names = {d.name for d in devices if d.kind == "gpu" and (plan.allowed is None or d.id in plan.allowed)}
    return names.pop() if len(names) == 1 else None


def model_identity(family: ModelFamily, spec: ModelSpec, source: Source) -> dict[str, Any]:
    return {
        "model_name": family.model_name,
        "model_format": spec.model_format,
        "model_size_in_billions": spec.model_size_in_billions,
        "quantization": spec.quantization,
        "source": source.model_dump(exclude_none=True),
    }


def memory_settings(
    model: dict[str, Any], engine: str, n_devices: int, breakdown: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """What a profile is keyed on besides the device model: the model (name, format, size,
    quantization, where its weights come from), the engine, how many devices share it, and what
    changes its memory (context, sequences, dtypes as the estimate resolved them; other options).
    The engine's own context and sequence options (n_ctx, n_parallel...) enter as resolved, so an
    estimate that says --context-length finds the profile of a launch that said n_ctx."""
    defaults = ESTIMATE_DEFAULTS.get(engine, ESTIMATE_DEFAULTS["transformers"])
    resolved = NOT_MEMORY | {defaults["context_option"], defaults["parallel_option"]}
    return {
        **model,
        "engine": engine,
        "n_devices": n_devices,
        "context_length": breakdown.get("context_length"),
        "parallel": breakdown.get("parallel"),
        "dtype": breakdown.get("dtype"),
        "kv_cache_dtype": options.get("kv_cache_dtype"),
        "options": {k: v for k, v in sorted(options.items()) if k not in resolved and v is not None},
    }


def profile_key(settings: dict[str, Any], device: str) -> str:
    text = json.dumps({"settings": settings, "device_model": device}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def fresh(profile: StoredProfile, versions: dict[str, str]) -> bool:
    """Measured under the libraries installed now."""
    return profile.versions == versions


def reservation_from_peak(peak: int, margin: float) -> int:
    return math.ceil(peak * (1 + margin))


def correction(
    profiles: Iterable[StoredProfile],
    engine: str,
    device: str,
    versions: dict[str, str],
    bounds: tuple[float, float] = CORRECTION_BOUNDS,
) -> float | None:
    """What the fresh profiles of the same engine on the same device model taught: the median of
    measured peak / formula estimate, within `bounds`; None when there is none to learn from."""
    ratios = [
        p.peak / p.estimate
        for p in profiles
        if p.engine == engine and p.device_model == device and p.estimate > 0 and fresh(p, versions)
    ]
    if not ratios:
        return None
    low, high = bounds
    return min(high, max(low, statistics.median(ratios)))


def apply(
    plan: LaunchPlan,
    stored: StoredProfile | None,
    versions: dict[str, str],
    ratio: float | None,
    margin: float,
) -> LaunchPlan:
    """The plan placed on its stored profile when that is fresh, else on the formula scaled by the
    similar models' ratio (with the margin), else on the formula. A declared gpu_memory wins over all.
    The breakdown says which (`memory_source`) and keeps the formula's figure beside it."""
    formula = int(plan.breakdown.get("formula_per_device", plan.per_device))
    use_profile = stored is not None and fresh(stored, versions)
    info: dict[str, Any] = {
        "formula_per_device": formula,
        "profile": None
        if stored is None
        else {
            "reserved_bytes": stored.reserved,
            "peak_bytes": stored.peak,
            "margin": stored.margin,
            "measured_at": stored.measured,
            "device_model": stored.device_model,
            "versions": stored.versions,
            "stale": not use_profile,
        },
        "correction": None,
    }
    if plan.breakdown.get("declared") is not None:
        per_device, source = plan.per_device, "declared"
    elif use_profile:
        assert stored is not None
        per_device, source = stored.reserved, "profile"
    elif ratio is not None:
        per_device, source = math.ceil(formula * ratio * (1 + margin)), "corrected"
        info["correction"] = round(ratio, 4)
    else:
        per_device, source = formula, "formula"
    breakdown = {**plan.breakdown, **info, "memory_source": source, "per_device": per_device}
    return replace(plan, per_device=per_device, breakdown=breakdown)


def wants_profile_run(mode: str, plan: LaunchPlan) -> bool:
    """Whether this launch's runner drives a profile run: not when a fresh profile or a declared size
    placed it; by mode, on real GPUs only (gpu, the default) or everywhere (all)."""
    if mode == "off" or plan.breakdown.get("memory_source") in ("profile", "declared"):
        return False
    return mode == "all" or plan.real_gpu


class ProfileBook:
    """The stored profiles, read at planning and written once a replica's profile run is measured."""

    def __init__(self, store: StateStore, mode: str, margin: float) -> None:
        if mode not in MODES:
            raise ValueError(f"SHOAL_PROFILE must be one of {', '.join(MODES)}, not {mode!r}")
        if not 0 <= margin <= 1:
            raise ValueError(f"SHOAL_PROFILE_MARGIN must be between 0 and 1, not {margin!r}")
        self.store, self.mode, self.margin = store, mode, margin

    def place(
        self,
        plan: LaunchPlan,
        model: dict[str, Any],
        engine: str,
        options: dict[str, Any],
        devices: Sequence[Device],
    ) -> LaunchPlan:
        """The plan on its stored profile, or on the corrected formula; the key goes in the breakdown."""
        device = device_model(plan, devices)
        settings = memory_settings(model, engine, plan.n_devices, plan.breakdown, options)
        plan = replace(
            plan, breakdown={**plan.breakdown, "profile_settings": settings, "device_model": device}
        )
        if device is None:
            return apply(plan, None, {}, None, self.margin)
        versions = library_versions(engine)
        stored = self.store.profiles(profile_key(settings, device))
        ratio = correction(self.store.profiles(), engine, device, versions)
        return apply(plan, stored[0] if stored else None, versions, ratio, self.margin)

    def on_profile(self, plan: LaunchPlan, profile: StoredProfile) -> LaunchPlan:
        """The plan of a running model once its profile is stored: a restart or a reload after an
        eviction is placed on it (and runs no second profile run)."""
        return apply(plan, profile, profile.versions, None, self.margin)

    def measured_device(
        self, snapshot: Snapshot, devices: Sequence[str], pid: int | None
    ) -> tuple[str, int] | None:
        """(device model, peak bytes per device) of a runner just profiled, or None where it cannot be
        read (a runner on a Ray node's CPU, or a process already gone)."""
        by_id = {d.id: d for d in snapshot.devices}
        placed = [by_id[d] for d in devices if d in by_id]
        peaks = [snapshot.peak(d, pid) for d in placed]
        if not placed or any(p is None or p <= 0 for p in peaks):
            return None
        first = placed[0]
        name = "cpu" if first.kind == "cpu" else "fake GPU" if first.fake else first.name
        return name, max(p for p in peaks if p is not None)

    def record(self, plan: LaunchPlan, engine: str, device: str, peak: int) -> StoredProfile:
        """Store what a replica's profile run peaked at on `device` (its GPU's name, "cpu", "fake GPU")."""
        settings = plan.breakdown["profile_settings"]
        profile = StoredProfile(
            key=profile_key(settings, device),
            model=str(settings.get("model_name")),
            engine=engine,
            device_model=device,
            settings=settings,
            versions=library_versions(engine),
            estimate=int(plan.breakdown.get("formula_per_device", plan.per_device)),
            peak=peak,
            reserved=reservation_from_peak(peak, self.margin),
            margin=self.margin,
            measured=time.time(),
        )
        self.store.save_profile(profile)
        return profile
