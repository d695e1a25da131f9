"""Shoal: one inference server for every model kind, packed onto GPUs by memory."""

from shoal.client import Client

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]
