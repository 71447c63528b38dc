"""DequantizeLinear: y = (x - zero_point) * scale, per tensor or along `axis` (opset 13 and up).

The stored integers (int8, uint8, int4 as int8) stay buffers; in a model compressed with integer layers
their scales are trainable parameters (graph.PARAM_INPUTS), so fine-tuning moves the per-channel scales
and the corrected biases and keeps the integers frozen. Blocked quantization (block_size > 0) is not
implemented.
"""

from __future__ import annotations

import torch

from .registry import UnsupportedAttribute, register


def dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, axis: int) -> torch.Tensor:
    """(x - zero_point) * scale in scale's dtype; a 1-D scale (and zero point) runs along `axis` of x."""
    y = x.to(scale.dtype)
    if zero_point is not None:
        zero_point = zero_point.to(scale.dtype)
    if scale.dim() == 1 and x.dim() > 0:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape) if zero_point is not None else None
    return (y - zero_point if zero_point is not None else y) * scale


@register("DequantizeLinear")
def _dequantize_linear(node, x, scale, zero_point=None):
    block = node.attrs.get("block_size", 0)
    if block:
        raise UnsupportedAttribute(f"block_size={block}")
    return dequantize(x, scale, zero_point, node.attrs.get("axis", 1))
