"""The onnxstack command line: a thin layer over the public API."""

from .app import main

__all__ = ["main"]
