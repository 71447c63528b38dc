"""ONNX operators as torch functions: the registry the graph interpreter dispatches on.

Each entry is `fn(node, *inputs) -> Tensor | tuple[Tensor, ...]` where `node` carries the decoded
attributes and the default-domain opset; missing optional inputs arrive as None. Semantics follow the
ONNX operator spec of that opset (inference mode: BatchNormalization uses its stored statistics,
Dropout is the identity). Shape-like inputs (Reshape's shape, Slice's starts, Pad's pads, ...) are
read as Python ints, so any batch size works without re-building the module.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

OPS: dict[str, Callable] = {}

# ONNX TensorProto.DataType -> torch dtype (the types a CNN graph computes with)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


class UnsupportedAttribute(ValueError):
    """A supported op used with an attribute value the bridge does not implement."""


def register(*names: str):
    def deco(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return deco


def ints(t) -> list[int]:
    """A shape-like tensor (or list) as Python ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def scalar(t) -> float | None:
    return None if t is None else float(t.reshape(-1)[0].item())


# --- convolution and linear ------------------------------------------------------------------------


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


# --- activations and elementwise ---------------------------------------------------------------------

register("Relu")(lambda node, x: F.relu(x))
register("Sigmoid")(lambda node, x: torch.sigmoid(x))
register("Tanh")(lambda node, x: torch.tanh(x))
register("HardSwish")(lambda node, x: F.hardswish(x))
register("Exp")(lambda node, x: torch.exp(x))
register("Log")(lambda node, x: torch.log(x))
register("Sqrt")(lambda node, x: torch.sqrt(x))
register("Neg")(lambda node, x: -x)
register("Abs")(lambda node, x: torch.abs(x))
register("Erf")(lambda node, x: torch.erf(x))
register("Softplus")(lambda node, x: F.softplus(x))
register("Identity", "Dropout")(lambda node, x, *rest: x)
register("LeakyRelu")(lambda node, x: F.leaky_relu(x, node.attrs.get("alpha", 0.01)))
register("Elu")(lambda node, x: F.elu(x, node.attrs.get("alpha", 1.0)))
register("HardSigmoid")(lambda node, x: torch.clamp(node.attrs.get("alpha", 0.2) * x + node.attrs.get("beta", 0.5), 0, 1))
register("PRelu")(lambda node, x, slope: torch.where(x >= 0, x, x * slope))
register("Add")(lambda node, a, b: a + b)
register("Sub")(lambda node, a, b: a - b)
register("Mul")(lambda node, a, b: a * b)
register("Pow")(lambda node, a, b: torch.pow(a, b))
register("Max")(lambda node, *xs: _fold(torch.maximum, xs))
register("Min")(lambda node, *xs: _fold(torch.minimum, xs))
register("Sum")(lambda node, *xs: _fold(torch.add, xs))


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


@register("Div")
def _div(node, a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@register("Clip")
def _clip(node, x, lo=None, hi=None):
    if node.opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
    else:
        lo, hi = scalar(lo), scalar(hi)
    return torch.clamp(x, lo, hi)


@register("Softmax", "LogSoftmax")
def _softmax(node, x):
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if node.opset >= 13:
        return fn(x, node.attrs.get("axis", -1))
    axis = node.attrs.get("axis", 1) % x.dim()  # opset < 13: softmax over the flattened trailing axes
    return fn(x.reshape(*x.shape[:axis], -1), -1).reshape(x.shape)


@register("Cast")
def _cast(node, x):
    to = node.attrs["to"]
    if to not in DTYPES:
        raise UnsupportedAttribute(f"to={to}")
    return x.to(DTYPES[to])


# --- pooling -------------------------------------------------------------------------------------------


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


# --- shape and layout ---------------------------------------------------------------------------------


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


# --- resize --------------------------------------------------------------------------------------------


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
