"""Turn a spec's source into a local path. Package and path sources resolve without importing the
package (some model packages import heavy things in __init__); hub sources are downloaded by the
gateway (shoal.hub) before a runner starts, and reach the runner as a path."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from shoal.catalog.specs import Source
from shoal.catalog.weights import check_path
from shoal.errors import InvalidRequest


def local_path(source: Source) -> Path | None:
    """The weights' local path, or None when they must be downloaded. Raises when they are missing."""
    if source.path:
        path = Path(source.path).expanduser()
        check_path(path)  # exists, and is a regular file or folder (not a device, not in /proc)
        return path
    if source.python_package:
        spec = importlib.util.find_spec(source.python_package)
        if source.assemble and spec is not None:  # joined once by the runner, then kept here
            target = assembled_path(source)
            return target if target.exists() else None
        if spec is None or not spec.submodule_search_locations:
            hint = f" (install it: {source.pip})" if source.pip else ""
            raise InvalidRequest(
                f"the package {source.python_package!r} that carries this model is not installed{hint}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        matches = sorted(folder.glob(source.pattern or "*"))
        if not matches:
            raise InvalidRequest(
                f"no {source.pattern!r} inside package {source.python_package!r} at {folder}"
            )
        return matches[0]
    return None


def assembled_path(source: Source) -> Path:
    assert source.python_package and source.pattern
    return Path(sys.prefix) / "share" / "shoal-models" / source.python_package / source.pattern


def materialize(source: Source) -> Path:
    """Local path of the weights, assembling split packages when needed (runner side only: it
    imports the model package)."""
    path = local_path(source)
    if path is not None:
        return path
    if source.python_package and source.assemble:
        target = assembled_path(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        module = importlib.import_module(source.python_package)
        getattr(module, source.assemble)(output_path=target)
        return target
    # The gateway downloads hub repos into its cache and hands the runner the local folder.
    repo = source.hf_repo or source.ms_repo
    raise InvalidRequest(f"hub repo {repo!r} is not in the cache; launch it again (the gateway downloads it)")
