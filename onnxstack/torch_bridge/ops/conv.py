"""Convolution, linear and normalisation ops, and the ONNX pad geometry that pooling and Pad share.

    Conv:          Y = conv(pad(X, pads | auto_pad), W) + b    asymmetric pads go through F.pad
    ConvTranspose: Y = crop_or_pad(conv_transpose(X, W), pads | output_shape | auto_pad) + b
    Gemm:          Y = alpha op(A) op(B) + beta C
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import UnsupportedAttribute, register


def conv_pads(in_sizes, kernel, strides, dilations, pads, auto_pad) -> tuple[list[int], list[int]]:
    """(begin, end) pads per spatial axis for ONNX pads / auto_pad semantics."""
    n = len(kernel)
    if auto_pad in (None, "", "NOTSET"):
        pads = list(pads) if pads else [0] * 2 * n
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for size, k, st, dl in zip(in_sizes, kernel, strides, dilations):
        total = max(0, (-(-size // st) - 1) * st + (k - 1) * dl + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin, end


def torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX-style per-axis (begin, end) pads of the trailing axes -> F.pad's last-axis-first list."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def conv_nd(x, w, b, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET"):
    """ONNX Conv on 1-3 spatial axes; asymmetric pads go through F.pad."""
    n = w.dim() - 2
    strides, dilations = list(strides or [1] * n), list(dilations or [1] * n)
    begin, end = conv_pads(x.shape[2:], w.shape[2:], strides, dilations, pads, auto_pad)
    if begin == end:
        padding = begin
    else:
        x, padding = F.pad(x, torch_pad(begin, end)), [0] * n
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, b, strides, padding, dilations, group)


@register("Conv")
def _conv(node, x, w, b=None):
    a = node.attrs
    return conv_nd(x, w, b, strides=a.get("strides"), pads=a.get("pads"), dilations=a.get("dilations"),
                   group=a.get("group", 1), auto_pad=a.get("auto_pad", "NOTSET"))


@register("ConvTranspose")
def _conv_transpose(node, x, w, b=None):
    a = node.attrs
    n = w.dim() - 2
    strides = list(a.get("strides") or [1] * n)
    dil = list(a.get("dilations") or [1] * n)
    out_pad = list(a.get("output_padding") or [0] * n)
    group = a.get("group", 1)
    ins, ks = list(x.shape[2:]), list(w.shape[2:])
    full = [st * (i - 1) + (k - 1) * d + 1 for i, k, st, d in zip(ins, ks, strides, dil)]
    auto_pad = a.get("auto_pad", "NOTSET")
    if a.get("output_shape") or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(a.get("output_shape") or [i * st for i, st in zip(ins, strides)])[-n:]
        total = [f + op_ - t for f, op_, t in zip(full, out_pad, target)]
        upper = auto_pad == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin)]
    elif auto_pad == "VALID":
        begin = end = [0] * n
    else:
        pads = list(a.get("pads") or [0] * 2 * n)
        begin, end = pads[:n], pads[n:]
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = fn(x, w, None, strides, 0, 0, group, dil)  # (B, N, *full)
    out = [f + p - bg - e for f, p, bg, e in zip(full, out_pad, begin, end)]
    y = F.pad(y, torch_pad([-bg for bg in begin], [o - f + bg for o, f, bg in zip(out, full, begin)]))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


@register("Gemm")
def _gemm(node, A, B, C=None):
    a = node.attrs
    A = A.t() if a.get("transA", 0) else A
    B = B.t() if a.get("transB", 0) else B
    y = a.get("alpha", 1.0) * (A @ B)
    return y if C is None else y + a.get("beta", 1.0) * C


register("MatMul")(lambda node, A, B: torch.matmul(A, B))


@register("BatchNormalization")
def _batch_norm(node, x, scale, bias, mean, var):
    if node.attrs.get("training_mode", 0) or len(node.outputs) > 1:
        raise UnsupportedAttribute("training_mode=1 (only inference-mode BatchNormalization)")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))
