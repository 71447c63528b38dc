"""Activations, arithmetic (broadcasting as in numpy), Clip, Softmax / LogSoftmax and Cast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import DTYPES, UnsupportedAttribute, register, scalar

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
