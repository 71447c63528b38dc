"""onnxstack: post-training compression of CNNs in ONNX with stacked low-dimensional binary filters."""

__version__ = "0.1.0"

from .api import CompressResult, compress, inspect, open_session  # noqa: E402
from .config import CompressConfig, LayerOverride  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DataError,
    ModelError,
    NothingToCompressError,
    OnnxstackError,
    OutputError,
)

__all__ = [
    "CompressConfig", "CompressResult", "LayerOverride", "compress", "inspect", "open_session",
    "OnnxstackError", "ModelError", "ConfigError", "NothingToCompressError", "DataError", "OutputError",
]
