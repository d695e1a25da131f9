"""Runner process entry point: `python -m shoal.runners.main CONFIG.json`.

Loads the engine first, then serves on the Unix socket (or on TCP, `listen`, on a Ray node); the
gateway treats a runner that answers /health as "ready". A load failure is written to the status
file for the gateway to report. A warm spare (shoal.runners.spare) calls main() after its handoff.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

STARTED = time.monotonic()  # before the imports below, so import time is counted

from shoal.catalog.resolve import materialize  # noqa: E402
from shoal.engines.base import EngineConfig  # noqa: E402
from shoal.engines.registry import load_class  # noqa: E402
from shoal.runners.config import RunnerConfig  # noqa: E402


def main(config_path: str, started: float = STARTED, prewarmed: bool = False) -> int:
    """`started`: when this runner began (a warm spare's handoff, shoal.runners.spare); `prewarmed`:
    the engine's libraries were imported before the launch."""
    config = RunnerConfig.model_validate_json(Path(config_path).read_text())
    timings: dict[str, float] = {"prewarmed": float(prewarmed)}
    try:
        engine_cls = load_class(config.engine)
        timings["import_seconds"] = time.monotonic() - started
        engine = engine_cls(
            EngineConfig(
                model_path=materialize(config.source),
                model_uid=config.model_uid,
                model_format=config.model_format,
                context_length=config.context_length,
                device=config.device,
                n_threads=config.n_threads,
                options=config.options,
                memory_bytes=config.memory_bytes,
            )
        )
        loading = time.monotonic()
        engine.load()
        timings["load_seconds"] = time.monotonic() - loading
    except Exception as exc:  # any load failure: report the engine's own reason, then exit
        traceback.print_exc()
        Path(config.status_file).write_text(f"{type(exc).__name__}: {exc}")
        return 2

    import socket

    import uvicorn

    from shoal.runners.app import build_runner_app

    where: dict[str, object] = {}
    if config.listen_fd is None and config.listen:
        host, _, port = config.listen.rpartition(":")
        where = {"host": host, "port": int(port)}
    elif config.listen_fd is None:
        socket_path = Path(config.socket)
        socket_path.unlink(missing_ok=True)
        where = {"uds": str(socket_path)}
    server = uvicorn.Server(
        uvicorn.Config(
            build_runner_app(engine, timings, profile=config.profile),
            **where,  # type: ignore[arg-type]
            log_level="warning",
            access_log=False,
            timeout_keep_alive=600,
            timeout_graceful_shutdown=5,
        )
    )
    if config.listen_fd is not None:
        # A runner on a Ray node serves on the TCP socket its agent bound. socket(fileno=) reads the
        # socket's real family; uvicorn's own fd= takes it for a Unix socket, so asyncio leaves
        # TCP_NODELAY off, and Nagle's algorithm then added about 50 ms to every request (measured).
        server.run(sockets=[socket.socket(fileno=config.listen_fd)])
    else:
        server.run()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
