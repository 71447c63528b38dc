"""Pooling (MaxPool, AveragePool with pads, ceil_mode and count_include_pad; global pools) and reductions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .conv import conv_pads, torch_pad
from .registry import UnsupportedAttribute, ints, register


def _pool_pads(node, x, kernel, strides, dilations):
    """(begin, end) pads including the extra end padding that ceil_mode's last windows need."""
    a = node.attrs
    begin, end = conv_pads(x.shape[2:], kernel, strides, dilations, a.get("pads"), a.get("auto_pad", "NOTSET"))
    extra = [0] * len(kernel)
    if a.get("ceil_mode", 0):
        for i, (size, k, st, dl) in enumerate(zip(x.shape[2:], kernel, strides, dilations)):
            span = (k - 1) * dl + 1
            out = -(-(size + begin[i] + end[i] - span) // st) + 1
            if (out - 1) * st >= size + begin[i]:  # the last window would start in the end padding
                out -= 1
            extra[i] = max(0, (out - 1) * st + span - (size + begin[i] + end[i]))
    return begin, end, extra


@register("MaxPool")
def _max_pool(node, x):
    if len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedAttribute("the Indices output")
    k = list(node.attrs["kernel_shape"])
    n = len(k)
    st, dl = list(node.attrs.get("strides") or [1] * n), list(node.attrs.get("dilations") or [1] * n)
    begin, end, extra = _pool_pads(node, x, k, st, dl)
    end = [e + x_ for e, x_ in zip(end, extra)]
    if any(begin) or any(end):
        x = F.pad(x, torch_pad(begin, end), value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return fn(x, k, st, 0, dl)


@register("AveragePool")
def _avg_pool(node, x):
    k = list(node.attrs["kernel_shape"])
    n = len(k)
    st, dl = list(node.attrs.get("strides") or [1] * n), list(node.attrs.get("dilations") or [1] * n)
    if any(d != 1 for d in dl):
        raise UnsupportedAttribute(f"dilations={dl}")
    begin, end, extra = _pool_pads(node, x, k, st, dl)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    if not any(begin) and not any(end) and not any(extra):
        return fn(x, k, st)
    # sum over each window / number of counted cells (real cells, plus declared pads if count_include_pad)
    count_pad = node.attrs.get("count_include_pad", 0)
    size = math.prod(k)
    full = torch_pad(begin, [e + x_ for e, x_ in zip(end, extra)])
    total = fn(F.pad(x, full), k, st) * size
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if count_pad:
        ones = F.pad(ones, torch_pad(begin, end), value=1.0)
        full = torch_pad([0] * n, extra)
    count = fn(F.pad(ones, full), k, st) * size
    return total / count


register("GlobalAveragePool")(lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True))
register("GlobalMaxPool")(lambda node, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True))


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(node, x, axes=None):
    legacy = node.opset < (13 if node.op_type == "ReduceSum" else 18)
    axes = list(node.attrs.get("axes", [])) if legacy else ints(axes)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    keep = bool(node.attrs.get("keepdims", 1))
    dims = tuple(a % x.dim() for a in axes)
    if node.op_type == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if node.op_type == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    return (x.amax if node.op_type == "ReduceMax" else x.amin)(dim=dims, keepdim=keep)
