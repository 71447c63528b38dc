"""The op registry: ONNX op type -> `fn(node, *inputs)`, and the helpers every converter reads inputs with."""

from __future__ import annotations

from typing import Callable

import torch

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
