"""Turn a spec's source into a local path. Package and path sources resolve without importing the
package (some model packages import heavy things in __init__); Hugging Face sources download, which
only the runner does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shoal.catalog.specs import Source
from shoal.errors import InvalidRequest


def local_path(source: Source) -> Path | None:
    """The weights' local path, or None when they must be downloaded. Raises when they are missing."""
    if source.path:
        path = Path(source.path).expanduser()
        if not path.exists():
            raise InvalidRequest(f"model path {path} does not exist")
        return path
    if source.python_package:
        spec = importlib.util.find_spec(source.python_package)
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


def materialize(source: Source) -> Path:
    """Local path of the weights, downloading from Hugging Face when needed (runner side only)."""
    path = local_path(source)
    if path is not None:
        return path
    from huggingface_hub import hf_hub_download, snapshot_download  # runner-only import

    assert source.hf_repo
    if source.hf_file:
        return Path(hf_hub_download(source.hf_repo, source.hf_file))
    return Path(snapshot_download(source.hf_repo))
