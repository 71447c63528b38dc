"""onnxstack: post-training compression of CNNs in ONNX with stacked low-dimensional binary filters.

The numpy core (onnxstack.core) imports without onnx, protobuf or torch: the names below that need
onnx are imported on first use.
"""

__version__ = "0.1.0"

from .config import CompressConfig, LayerOverride  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DataError,
    ModelError,
    NothingToCompressError,
    OnnxstackError,
    OutputError,
)

_LAZY = {"CompressResult": "api", "compress": "api", "inspect": "api", "open_session": "runtime"}

__all__ = [
    "CompressConfig", "CompressResult", "LayerOverride", "compress", "inspect", "open_session",
    "OnnxstackError", "ModelError", "ConfigError", "NothingToCompressError", "DataError", "OutputError",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxstack' has no attribute {name!r}")
