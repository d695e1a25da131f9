"""Child of benchmarks/launch.py: import an engine family's libraries (as a warm spare does), then
time one catalog model's load() and warm-up inference on the CPU. Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path


def main(name: str, family: str) -> None:
    from shoal.runners.spare import warm_imports

    warm_imports(family)
    from shoal.catalog import Catalog
    from shoal.catalog.resolve import local_path
    from shoal.catalog.specs import default_engine
    from shoal.engines.base import EngineConfig
    from shoal.engines.registry import load_class
    from shoal.state import StateStore

    with tempfile.TemporaryDirectory() as tmp:
        model = Catalog(StateStore(Path(tmp) / "state.db")).get(name)
    spec = model.pick_spec(None, None, None)  # the spec a launch without constraints gets
    assert spec.source is not None
    path = local_path(spec.source)
    assert path is not None, f"{name} is not available locally"
    engine_name = default_engine(model.model_type, spec.model_format)
    assert engine_name is not None
    config = EngineConfig(path, name, spec.model_format, model.context_length, "cpu")
    engine = load_class(engine_name)(config)
    started = time.monotonic()
    engine.load()
    loaded = time.monotonic()
    asyncio.run(engine.warm_up())
    warmed = time.monotonic()
    engine.close()
    print(json.dumps({"engine": engine_name, "load_s": round(loaded - started, 3),
                      "warm_up_s": round(warmed - loaded, 3)}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
