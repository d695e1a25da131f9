"""The model catalog: built-in specs shipped as JSON, plus user registrations kept in the data dir."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from shoal.catalog.specs import MODEL_TYPES, ModelFamily, ModelSpec, Source, default_engine
from shoal.catalog.weights import check_weights
from shoal.errors import Conflict, InvalidRequest, ModelNotFound
from shoal.state import StateStore

__all__ = ["Catalog", "ModelFamily", "ModelSpec", "Source", "default_engine"]


def _builtin_families() -> dict[str, ModelFamily]:
    families: dict[str, ModelFamily] = {}
    for entry in resources.files("shoal.catalog").joinpath("builtin").iterdir():
        if entry.name.endswith(".json"):
            family = ModelFamily.model_validate({**json.loads(entry.read_text()), "builtin": True})
            families[family.model_name] = family
    return families


class Catalog:
    """Looks up families by name; user registrations persist in the state store (SQLite)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._builtin = _builtin_families()
        self._user: dict[str, ModelFamily] = {}
        for _, body in store.registrations():
            family = ModelFamily.model_validate_json(body)
            self._user[family.model_name] = family

    def get(self, name: str, model_type: str | None = None) -> ModelFamily:
        family = self._user.get(name) or self._builtin.get(name)
        if family is None or (model_type and family.model_type.lower() != model_type.lower()):
            raise ModelNotFound(f"model {name!r} is not in the catalog (see GET /v1/model_registrations/LLM)")
        return family

    def list(self, model_type: str | None = None, search: str | None = None) -> list[ModelFamily]:
        """Families of one type ("all" or None: every type) whose text holds every word of `search`."""
        merged = {**self._builtin, **self._user}
        wanted = None if model_type is None or model_type.lower() == "all" else model_type.lower()
        return [
            f
            for f in merged.values()
            if wanted in (None, f.model_type.lower()) and (not search or f.matches(search))
        ]

    def register(self, model_type: str, raw: dict | str, persist: bool = True) -> ModelFamily:
        if model_type not in MODEL_TYPES:
            raise InvalidRequest(f"model_type must be one of {', '.join(MODEL_TYPES)}, not {model_type!r}")
        try:
            data = json.loads(raw) if isinstance(raw, str) else dict(raw)
            family = ModelFamily.model_validate({**data, "model_type": model_type, "builtin": False})
        except (ValueError, ValidationError) as exc:
            raise InvalidRequest(f"invalid model registration: {exc}") from exc
        if family.model_name in self._builtin:
            raise Conflict(f"{family.model_name!r} is a built-in model name; pick another")
        for spec in family.model_specs:
            assert spec.source is not None
            if spec.source.path:  # a regular file or folder holding weights of that format
                check_weights(Path(spec.source.path).expanduser(), spec.model_format)
        self._user[family.model_name] = family
        if persist:
            self._store.save_registration(family.model_name, family.model_type, family.model_dump_json())
        return family

    def unregister(self, name: str) -> None:
        if name in self._builtin and name not in self._user:
            raise InvalidRequest(f"{name!r} is built in and cannot be unregistered")
        if self._user.pop(name, None) is None:
            raise ModelNotFound(f"no registered model named {name!r}")
        self._store.delete_registration(name)
