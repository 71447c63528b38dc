"""Resize (opset >= 11) and Upsample: nearest and linear modes, separably one axis at a time.

Each output index i along an axis reads input coordinate x(i) from the coordinate_transformation_mode
formula (half_pixel: x = (i + 0.5) / scale - 0.5, ...); nearest rounds it by nearest_mode, linear
blends the two neighbours, both clamped to the input.
"""

from __future__ import annotations

import math

import torch

from .registry import UnsupportedAttribute, ints, register


@register("Resize", "Upsample")
def _resize(node, x, *args):
    a = node.attrs
    if node.op_type == "Upsample" or node.opset < 11:
        scales, sizes = (args[0] if args else None), None
        if scales is None:
            scales = torch.tensor(a["scales"])
        transform = "asymmetric"
    else:
        scales, sizes = (args + (None, None, None))[1:3]
        transform = a.get("coordinate_transformation_mode", "half_pixel")
    mode = a.get("mode", "nearest")
    if a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedAttribute("antialias or keep_aspect_ratio_policy")
    in_sizes = list(x.shape)
    axes = [ax % x.dim() for ax in a.get("axes", range(x.dim()))]
    out_sizes, scale_list = list(in_sizes), [1.0] * x.dim()
    if sizes is not None and sizes.numel():
        for ax, size in zip(axes, ints(sizes)):
            out_sizes[ax], scale_list[ax] = size, size / in_sizes[ax]
    else:
        for ax, sc in zip(axes, scales.reshape(-1).tolist()):
            out_sizes[ax], scale_list[ax] = int(math.floor(in_sizes[ax] * sc)), float(sc)
    for axis in range(x.dim()):
        if out_sizes[axis] == in_sizes[axis] and scale_list[axis] == 1.0:
            continue
        coords = _source_coords(transform, in_sizes[axis], out_sizes[axis], scale_list[axis], x.device)
        if mode == "nearest":
            x = x.index_select(axis, _nearest(coords, a.get("nearest_mode", "round_prefer_floor"), in_sizes[axis]))
        elif mode == "linear":
            x = _linear(x, axis, coords, in_sizes[axis])
        else:
            raise UnsupportedAttribute(f"mode={mode!r}")
    return x


def _source_coords(transform: str, n_in: int, n_out: int, scale: float, device) -> torch.Tensor:
    """Input coordinate of each output index along one axis (ONNX Resize formulas)."""
    i = torch.arange(n_out, dtype=torch.float64, device=device)
    if transform == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if transform == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if n_out > 1 else torch.zeros_like(i)
    if transform == "align_corners":
        return i * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros_like(i)
    if transform == "asymmetric":
        return i / scale
    if transform == "half_pixel_symmetric":
        adj = n_out / (scale * n_in) if n_in else 1.0
        center = n_in / 2
        return center * (1 - adj) + (i + 0.5) / scale - 0.5
    raise UnsupportedAttribute(f"coordinate_transformation_mode={transform!r}")


def _nearest(coords: torch.Tensor, mode: str, n_in: int) -> torch.Tensor:
    if mode == "round_prefer_floor":
        idx = torch.where(coords - torch.floor(coords) == 0.5, torch.floor(coords), torch.round(coords))
    elif mode == "round_prefer_ceil":
        idx = torch.floor(coords + 0.5)
    elif mode == "floor":
        idx = torch.floor(coords)
    elif mode == "ceil":
        idx = torch.ceil(coords)
    else:
        raise UnsupportedAttribute(f"nearest_mode={mode!r}")
    return idx.clamp(0, n_in - 1).long()


def _linear(x: torch.Tensor, axis: int, coords: torch.Tensor, n_in: int) -> torch.Tensor:
    coords = coords.clamp(0, n_in - 1)
    lo = torch.floor(coords).long()
    hi = (lo + 1).clamp(max=n_in - 1)
    w = (coords - lo).to(x.dtype).reshape([-1 if d == axis else 1 for d in range(x.dim())])
    return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
