"""ONNX operators as torch functions: the registry the graph interpreter dispatches on.

Each entry is `fn(node, *inputs) -> Tensor | tuple[Tensor, ...]` where `node` carries the decoded
attributes and the default-domain opset; missing optional inputs arrive as None. Semantics follow the
ONNX operator spec of that opset (inference mode: BatchNormalization uses its stored statistics,
Dropout is the identity). Shape-like inputs (Reshape's shape, Slice's starts, Pad's pads, ...) are
read as Python ints, so any batch size works without re-building the module.

The converters live in one module per op family (conv, elementwise, pool, shape, resize, quant); importing this
package registers them all in OPS, in that order.
"""

from __future__ import annotations

# registers the converters, in the order OPS has always listed them
from . import conv, elementwise, pool  # noqa: F401, I001
from . import shape  # noqa: F401, I001
from . import resize  # noqa: F401, I001
from . import quant  # noqa: F401, I001
from .conv import conv_nd, conv_pads, torch_pad
from .registry import DTYPES, OPS, UnsupportedAttribute, ints, register, scalar

__all__ = ["DTYPES", "OPS", "UnsupportedAttribute", "conv_nd", "conv_pads", "ints", "register", "scalar", "torch_pad"]
