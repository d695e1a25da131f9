"""The web UI: the static files of `shoal.ui` served at /ui, and GET / redirected there."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_PATH = "/ui"


def static_dir() -> Path:
    """The folder of index.html, app.js and style.css inside the installed package."""
    folder = Path(str(files("shoal.ui") / "static"))
    if not (folder / "index.html").is_file():
        raise RuntimeError(f"the web UI's files are missing from {folder}; reinstall shoal")
    return folder


class _NoCacheStatic(StaticFiles):
    """Static files the browser revalidates each time, so an upgraded server serves its new UI."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the UI at /ui/ (index.html for the folder) and send / and /ui there."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(UI_PATH + "/")

    @app.get(UI_PATH, include_in_schema=False)
    async def ui_without_slash() -> RedirectResponse:
        return RedirectResponse(UI_PATH + "/")

    app.mount(UI_PATH, _NoCacheStatic(directory=static_dir(), html=True), name="ui")
