"""A vectorised numpy Conv (N-D spatial = 2), the arithmetic the reference op is specified by.

Semantics follow ONNX Conv: strides, pads (begin..., end...), dilations, group, auto_pad.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def resolve_pads(in_hw, kernel, strides, dilations, pads, auto_pad) -> list[int]:
    """Explicit [top, left, bottom, right] pads for ONNX auto_pad / pads semantics."""
    if auto_pad in (None, "", "NOTSET"):
        return list(pads) if pads else [0, 0, 0, 0]
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for size, k, st, dl in zip(in_hw, kernel, strides, dilations):
        out = -(-size // st)
        total = max(0, (out - 1) * st + (k - 1) * dl + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin + end


def conv2d(x, w, b=None, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET"):
    """x (B, C, H, W), w (N, C/group, kh, kw), b (N,) -> (B, N, H', W')."""
    B, C, H, W = x.shape
    N, Cg, kh, kw = w.shape
    strides = list(strides or [1, 1])
    dilations = list(dilations or [1, 1])
    if Cg * group != C or N % group:
        raise ValueError(f"conv2d: x.shape={x.shape}, w.shape={w.shape}, group={group} do not fit")
    top, left, bottom, right = resolve_pads((H, W), (kh, kw), strides, dilations, pads, auto_pad)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    win = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))  # (B, C, H'', W'', sh, sw)
    win = win[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]  # (B, C, Ho, Wo, kh, kw)
    Ho, Wo = win.shape[2:4]
    win = win.reshape(B, group, Cg, Ho, Wo, kh, kw)
    wg = w.reshape(group, N // group, Cg, kh, kw)
    y = np.einsum("bgchwij,gncij->bgnhw", win, wg, optimize=True).reshape(B, N, Ho, Wo)
    if b is not None:
        y = y + b.reshape(1, N, 1, 1)
    return y.astype(x.dtype, copy=False)
