"""The gateway: the only package that imports FastAPI. `build_app()` is its composition root."""
