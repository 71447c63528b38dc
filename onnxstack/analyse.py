"""Which Conv nodes qualify for compression, and why the others do not.

Every Conv of the main graph comes back as a ConvInfo: eligible, or skipped with a reason. Nothing
here raises for an unusual layer; reasons are data that the report shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .config import CompressConfig
from .op import CONV_ATTRS


@dataclass(frozen=True)
class ConvInfo:
    """One Conv node. shape is the weight's (N, C/group, kh, kw) when known."""

    name: str
    node_index: int
    weight_name: str
    bias_name: str | None
    shape: tuple[int, ...] | None
    group: int
    attrs: dict = field(repr=False)
    reason: str | None = None  # None: eligible

    @property
    def eligible(self) -> bool:
        return self.reason is None


def layer_name(node: onnx.NodeProto, index: int) -> str:
    """The name a Conv is known by in configs and reports (its node name, else Conv_<index>)."""
    return node.name or f"Conv_{index}"


def constant_initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers a caller cannot override (not also listed as graph inputs, IR >= 4)."""
    inputs = {i.name for i in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def analyse(model: onnx.ModelProto, config: CompressConfig) -> list[ConvInfo]:
    """One ConvInfo per Conv node of the main graph, in graph order."""
    graph = model.graph
    consts = constant_initializers(graph) if model.ir_version >= 4 else {t.name: t for t in graph.initializer}
    out = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = layer_name(node, i)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in CONV_ATTRS}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        group = int(attrs.get("group", 1))
        weight = node.input[1] if len(node.input) > 1 else ""
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        tensor = consts.get(weight)
        shape = tuple(tensor.dims) if tensor is not None else None
        reason = _reason(name, weight, tensor, bias, consts, group, config)
        out.append(ConvInfo(name, i, weight, bias, shape, group, attrs, reason))
    return out


def _reason(name, weight, tensor, bias, consts, group, config) -> str | None:
    settings = config.for_layer(name)
    d = settings.slice_dim
    if settings.skip:
        return settings.skip_reason
    if tensor is None:
        return f"weight '{weight}' is not a constant initializer"
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return f"weight is {onnx.TensorProto.DataType.Name(tensor.data_type)}, only FLOAT is supported"
    if len(tensor.dims) != 4:
        return f"{len(tensor.dims) - 2}-D convolution (weight rank {len(tensor.dims)}); only 2-D is supported"
    if bias is not None and bias not in consts:
        return f"bias '{bias}' is not a constant initializer"
    n_out, cg, kh, kw = tensor.dims
    if group > 1 and cg < d:
        kind = "depthwise" if cg == 1 else "grouped"
        return f"{kind} conv with {cg} input channel(s) a group, fewer than slice depth d={d}"
    if cg < d:
        return f"{cg} input channels, fewer than slice depth d={d}"
    slices = n_out * -(-cg // d)
    if slices < 2:
        return f"only {slices} slice, a codebook needs at least 2"
    if not np.isfinite(numpy_helper.to_array(tensor)).all():
        return "weight holds NaN or Inf"
    return None
