"""Desired state that survives a restart, in SQLite under the data dir: user registrations, the
models that should be running (with their launch settings and last devices), API keys (hashed),
and measured memory profiles (services/profiles.py).

The standard library's sqlite3, one short transaction per change; the gateway is the only writer
besides `shoal keys`, and SQLite's own locking covers that.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    name TEXT PRIMARY KEY, model_type TEXT NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    uid TEXT PRIMARY KEY, request TEXT NOT NULL, devices TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, scope TEXT NOT NULL, name TEXT, created REAL NOT NULL
);
-- Measured memory profiles (services/profiles.py): one row per model, engine, memory settings and
-- device model; `versions` are the engine's libraries when it was measured.
CREATE TABLE IF NOT EXISTS profiles (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, engine TEXT NOT NULL, device_model TEXT NOT NULL,
    settings TEXT NOT NULL, versions TEXT NOT NULL, estimate INTEGER NOT NULL, peak INTEGER NOT NULL,
    reserved INTEGER NOT NULL, margin REAL NOT NULL, measured REAL NOT NULL
);
"""
SCOPES = ("inference", "admin")
PROFILE_COLUMNS = (
    "key, model, engine, device_model, settings, versions, estimate, peak, reserved, margin, measured"
)


@dataclass(frozen=True)
class SavedModel:
    uid: str
    request: dict[str, Any]
    devices: list[list[str]]  # per replica, where it last ran


@dataclass(frozen=True)
class StoredProfile:
    """A replica's measured peak (bytes per device) under one key; `reserved` = peak × (1 + margin)."""

    key: str
    model: str
    engine: str
    device_model: str
    settings: dict[str, Any]
    versions: dict[str, str]
    estimate: int  # the formula's bytes per device for the same launch
    peak: int
    reserved: int
    margin: float
    measured: float  # time.time() of the measurement


@dataclass(frozen=True)
class ApiKey:
    id: str
    scope: str
    name: str | None
    created: float


def hash_key(key: str) -> str:
    # Keys are 32 random bytes: a plain SHA-256 is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:  # commits, or rolls back on an exception
                yield db
        finally:
            db.close()

    # ---- registrations -------------------------------------------------------------------------
    def registrations(self) -> list[tuple[str, str]]:
        with self._db() as db:
            return [(t, b) for t, b in db.execute("SELECT model_type, body FROM registrations ORDER BY name")]

    def save_registration(self, name: str, model_type: str, body: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO registrations VALUES (?, ?, ?)", (name, model_type, body))

    def delete_registration(self, name: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM registrations WHERE name = ?", (name,))

    # ---- desired models ------------------------------------------------------------------------
    def models(self) -> list[SavedModel]:
        with self._db() as db:
            rows = db.execute("SELECT uid, request, devices FROM models ORDER BY created").fetchall()
        return [SavedModel(uid, json.loads(request), json.loads(devices)) for uid, request, devices in rows]

    def save_model(self, uid: str, request: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO models (uid, request, devices, created) VALUES (?, ?, "
                "COALESCE((SELECT devices FROM models WHERE uid = ?), '[]'), ?)",
                (uid, json.dumps(request), uid, time.time()),
            )

    def save_devices(self, uid: str, devices: list[list[str]]) -> None:
        with self._db() as db:
            db.execute("UPDATE models SET devices = ? WHERE uid = ?", (json.dumps(devices), uid))

    def delete_model(self, uid: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM models WHERE uid = ?", (uid,))

    # ---- measured profiles --------------------------------------------------------------------
    def save_profile(self, p: StoredProfile) -> None:
        with self._db() as db:
            db.execute(
                f"INSERT OR REPLACE INTO profiles ({PROFILE_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                (p.key, p.model, p.engine, p.device_model, json.dumps(p.settings, sort_keys=True),
                 json.dumps(p.versions, sort_keys=True), p.estimate, p.peak, p.reserved, p.margin,
                 p.measured),
            )  # fmt: skip

    def profiles(self, key: str | None = None) -> list[StoredProfile]:
        """All profiles, or the one under `key`."""
        query = f"SELECT {PROFILE_COLUMNS} FROM profiles" + (
            " WHERE key = ?" if key else " ORDER BY measured"
        )
        with self._db() as db:
            rows = db.execute(query, (key,) if key else ()).fetchall()
        return [
            StoredProfile(k, m, e, d, json.loads(s), json.loads(v), est, peak, res, margin, when)
            for k, m, e, d, s, v, est, peak, res, margin, when in rows
        ]

    # ---- API keys ------------------------------------------------------------------------------
    def create_key(self, scope: str, name: str | None = None) -> tuple[ApiKey, str]:
        """A new key: the secret is returned once and only its hash is kept."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        secret = "sk-shoal-" + secrets.token_urlsafe(32)
        key = ApiKey(secrets.token_hex(4), scope, name, time.time())
        with self._db() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
                (key.id, hash_key(secret), scope, name, key.created),
            )
        return key, secret

    def keys(self) -> list[ApiKey]:
        with self._db() as db:
            rows = db.execute("SELECT id, scope, name, created FROM api_keys ORDER BY created").fetchall()
        return [ApiKey(*row) for row in rows]

    def key_scope(self, secret: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT scope FROM api_keys WHERE hash = ?", (hash_key(secret),)).fetchone()
        return row[0] if row else None

    def delete_key(self, key_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount > 0
