"""Shape and layout ops. Shape-like inputs are read as Python ints, so any batch size works."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .conv import torch_pad
from .registry import UnsupportedAttribute, ints, register, scalar


@register("Flatten")
def _flatten(node, x):
    axis = node.attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


@register("Reshape")
def _reshape(node, x, shape):
    shape = ints(shape)
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register("Transpose")
def _transpose(node, x):
    perm = node.attrs.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


@register("Concat")
def _concat(node, *xs):
    return torch.cat([x for x in xs if x is not None and (x.dim() != 1 or x.numel())], dim=node.attrs["axis"])


@register("Split")
def _split(node, x, split=None):
    axis = node.attrs.get("axis", 0)
    sizes = list(node.attrs.get("split", [])) if node.opset < 13 else ints(split)
    if not sizes:
        parts = node.attrs.get("num_outputs", len(node.outputs))
        sizes = -(-x.shape[axis] // parts)
    return tuple(torch.split(x, sizes, dim=axis))


@register("Slice")
def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) or list(range(len(starts)))
    steps = ints(steps) or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis, dim = axis % x.dim(), x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            x = x.narrow(axis, start, max(0, end - start))
            if step > 1:
                x = x[(slice(None),) * axis + (slice(None, None, step),)]
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            x = x.index_select(axis, torch.arange(start, end, step, device=x.device))
    return x


@register("Pad")
def _pad(node, x, pads=None, value=None, axes=None):
    a = node.attrs
    if node.opset < 11:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    else:
        pads, value = ints(pads), scalar(value) or 0.0
    rank = x.dim()
    axes = [ax % rank for ax in ints(axes)] or list(range(rank))
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[n + i]
    first = next((i for i in range(rank) if begin[i] or end[i]), rank)
    mode = a.get("mode", "constant")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if mode is None:
        raise UnsupportedAttribute(f"mode={a.get('mode')!r}")
    spec = torch_pad(begin[first:], end[first:])
    return F.pad(x, spec, mode=mode, value=value) if mode == "constant" else F.pad(x, spec, mode=mode)


@register("Shape")
def _shape(node, x):
    dims = list(x.shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


@register("Gather")
def _gather(node, x, idx):
    axis = node.attrs.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).to(x.device)
    return x.index_select(axis, idx.reshape(-1)).reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


@register("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    axes = list(node.attrs["axes"]) if node.opset < 13 else ints(axes)
    rank = x.dim() + len(axes)
    for ax in sorted(a % rank for a in axes):
        x = x.unsqueeze(ax)
    return x


@register("Squeeze")
def _squeeze(node, x, axes=None):
    axes = list(node.attrs.get("axes", [])) if node.opset < 13 else ints(axes)
    if not axes:
        return x.squeeze()
    for ax in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(ax)
    return x


@register("Expand")
def _expand(node, x, shape):
    shape = ints(shape)
    rank = max(len(shape), x.dim())
    full = [1] * (rank - len(shape)) + shape
    dims = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(dims).expand([max(a, b) for a, b in zip(full, dims)])


@register("ConstantOfShape")
def _constant_of_shape(node, shape):
    value = node.attrs.get("value")
    if value is None:
        return torch.zeros(ints(shape), dtype=torch.float32, device=shape.device)
    return value.to(shape.device).reshape(()).expand(ints(shape)).clone()
