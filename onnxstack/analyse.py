"""Which Conv nodes qualify for compression, and why the others do not.

Every Conv of the main graph comes back as a ConvInfo: eligible, or skipped with a reason; Convs
inside subgraphs (If, Loop, Scan bodies) come back skipped. Nothing here raises for an unusual
layer; reasons are data that the report shows.

Numbers that would break the stored form are reasons too: NaN or Inf weights or bias, an all-zero
weight, and weights whose scales float16 cannot hold. A scale is about the mean |w| of the weights it
covers (a slice, or a filter); the layer is skipped when rounding those magnitudes to float16 would
cost more than F16_LOSS of the weight's norm (underflow) or when one exceeds float16's range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from .config import CompressConfig
from .core.fit import F16_MAX, ceil_div, slice_depth, to_slices
from .graphs import subgraphs
from .op import CONV_ATTRS

INT_MIN_OPSET = 13  # DequantizeLinear with a per-axis scale
F16_LOSS = 0.01  # largest share of a weight's norm that rounding its scales to float16 may cost


@dataclass(frozen=True)
class ConvInfo:
    """One Conv node. shape is the weight's (N, C/group, kh, kw) when known; node_index is -1 inside a subgraph."""

    name: str
    node_index: int
    weight_name: str
    bias_name: str | None
    shape: tuple[int, ...] | None
    group: int
    attrs: dict = field(repr=False)
    reason: str | None = None  # None: eligible
    pixels: int | None = None  # output pixels an image (H*W) where shape inference knows them
    # what the file stores for the weight when it is not a constant: (tensor name, bits) of the initializers
    # and Constant nodes it is computed from (the report counts them, before and after)
    weight_sources: tuple[tuple[str, int], ...] = ()
    weight_read_elsewhere: bool = False  # a node other than a Conv reads the weight: the rewrite keeps it
    bias_bits: int | None = None  # bits the file stores for a constant bias

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
    """One ConvInfo per Conv node of the main graph, in graph order, then those of subgraphs (skipped)."""
    graph = model.graph
    consts = constant_initializers(graph) if model.ir_version >= 4 else {t.name: t for t in graph.initializer}
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    context = _Context(consts, {o: n for n in graph.node for o in n.output}, {i.name for i in graph.input},
                       {t.name for t in graph.initializer}, opset)
    out = []
    pixels = _output_pixels(model)
    readers: dict[str, set[str]] = {}  # value name -> op types of the main-graph nodes that read it
    for node in graph.node:
        for v in node.input:
            readers.setdefault(v, set()).add(node.op_type if _is_conv(node) else "other")
    for i, node in enumerate(graph.node):
        if _is_conv(node):
            name = layer_name(node, i)
            info = _info(node, name, i, context, _reason(name, node, context, config))
            sources = () if info.weight_name in consts else _sources(info.weight_name, context)
            bias = consts.get(info.bias_name) if info.bias_name else None
            out.append(replace(info, pixels=pixels.get(node.output[0]), weight_sources=sources,
                               weight_read_elsewhere="other" in readers.get(info.weight_name, ()),
                               bias_bits=_tensor_bits(bias) if bias is not None else None))
    for i, node in enumerate(graph.node):
        out.extend(_subgraph_convs(node, layer_name(node, i), consts))
    return out


@dataclass(frozen=True)
class _Context:
    consts: dict  # name -> TensorProto
    producers: dict  # value name -> node of the main graph
    inputs: set  # graph input names
    initializers: set  # initializer names
    opset: int = 1  # the default-domain opset (integer layers need per-channel DequantizeLinear)


def _output_pixels(model: onnx.ModelProto) -> dict[str, int]:
    """Spatial size (product of the dims after N, C) of every value whose shape inference fixes it."""
    from .load import skeleton  # shape inference on the skeleton: no pass over the weights

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model)[0])
    except Exception:  # noqa: BLE001 - sizes are a hint for the cost model; unknown is fine
        return {}
    out = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if len(dims) >= 3 and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[2:]):
            out[vi.name] = int(np.prod([d.dim_value for d in dims[2:]]))
    return out


def _sources(name: str, context: "_Context", depth: int = 32) -> tuple[tuple[str, int], ...]:
    """(name, bits) of the stored tensors a non-constant value is computed from, in the main graph."""
    found: dict[str, int] = {}
    todo, seen = [(name, 0)], set()
    while todo:
        value, level = todo.pop()
        if value in seen or not value or level > depth:
            continue
        seen.add(value)
        if value in context.consts:
            found[value] = _tensor_bits(context.consts[value])
            continue
        node = context.producers.get(value)
        if node is None:
            continue  # a graph input: nothing stored
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if t is not None:
                found[value] = _tensor_bits(t)
            continue
        todo.extend((v, level + 1) for v in node.input)
    return tuple(sorted(found.items()))


def _tensor_bits(t: onnx.TensorProto) -> int:
    try:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        size = 4
    return 8 * size * int(np.prod(t.dims, dtype=np.int64))


def _is_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def _info(node, name, index, context, reason) -> ConvInfo:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name in CONV_ATTRS}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    weight = node.input[1] if len(node.input) > 1 else ""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    tensor = context.consts.get(weight)
    shape = tuple(tensor.dims) if tensor is not None else None
    if shape is not None and len(shape) == 4:
        attrs.setdefault("kernel_shape", list(shape[2:]))  # the rewritten node states it (see op.node_attributes)
    return ConvInfo(name, index, weight, bias, shape, int(attrs.get("group", 1)), attrs, reason)


def _subgraph_convs(node: onnx.NodeProto, parent: str, consts: dict) -> list[ConvInfo]:
    """Convs inside the graph attributes of a node (recursively), skipped with the reason."""
    out = []
    for attr_name, sub in subgraphs(node):
        inner = {**consts, **{t.name: t for t in sub.initializer}}
        context = _Context(inner, {}, set(), set())
        where = f"{parent}/{attr_name}"
        for i, n in enumerate(sub.node):
            if _is_conv(n):
                reason = (f"inside the '{attr_name}' subgraph of {node.op_type} node '{parent}'; only Convs of "
                          "the main graph are compressed")
                out.append(_info(n, f"{where}/{layer_name(n, i)}", -1, context, reason))
            out.extend(_subgraph_convs(n, f"{where}/{layer_name(n, i)}", inner))
    return out


def _reason(name, node, context, config) -> str | None:
    settings = config.for_layer(name)
    d = settings.slice_dim
    if settings.skip:
        return settings.skip_reason
    weight = node.input[1] if len(node.input) > 1 else ""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    consts, group = context.consts, int(next((a.i for a in node.attribute if a.name == "group"), 1))
    tensor = consts.get(weight)
    if tensor is None:
        return _not_constant("weight", weight, context)
    if tensor.data_type != onnx.TensorProto.FLOAT:
        return f"weight is {onnx.TensorProto.DataType.Name(tensor.data_type)}, only FLOAT is supported"
    if len(tensor.dims) == 3:
        return f"1-D convolution whose weight '{weight}' other nodes also read (only unshared 1-D weights are lifted to 2-D)"
    if len(tensor.dims) != 4:
        return f"{len(tensor.dims) - 2}-D convolution (weight rank {len(tensor.dims)}); only 1-D and 2-D are supported"
    if bias is not None and bias not in consts:
        return _not_constant("bias", bias, context)
    if settings.int_bits is not None:
        return _finite_reason(numpy_helper.to_array(tensor), bias, consts) or _int_reason(settings, context)
    n_out, cg, kh, kw = tensor.dims
    if group > 1 and cg < d:
        kind = "depthwise" if cg == 1 else "grouped"
        return f"{kind} conv with {cg} input channel(s) a group, fewer than slice depth d={d}"
    if cg < d:
        return f"{cg} input channels, fewer than slice depth d={d}"
    slices = n_out * ceil_div(cg, d)
    if slices < 2:
        return f"only {slices} slice, a codebook needs at least 2"
    w = numpy_helper.to_array(tensor)
    return _finite_reason(w, bias, consts) or _float16_reason(w, d, settings.scale)


def _finite_reason(w: np.ndarray, bias, consts) -> str | None:
    if not np.isfinite(w).all():
        return "weight holds NaN or Inf"
    if bias is not None and not np.isfinite(numpy_helper.to_array(consts[bias])).all():
        return "bias holds NaN or Inf"
    if not w.any():
        return "all weights are zero (the layer outputs its bias; nothing to compress)"
    return None


def _int_reason(settings, context: _Context) -> str | None:
    """Why an integer layer cannot be stored (checked instead of the slice and float16 checks)."""
    if context.opset < INT_MIN_OPSET:
        return (f"{settings.representation} per-channel weights need DequantizeLinear with axis "
                f"(opset >= {INT_MIN_OPSET}, model has {context.opset}); left dense")
    return None


def _not_constant(role: str, name: str, context: _Context) -> str:
    producer = context.producers.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return (f"{role} '{name}' comes from DequantizeLinear '{producer.name}' (a quantized model); "
                "quantized weights are left as they are")
    if producer is not None:
        return f"{role} '{name}' is computed by a {producer.op_type} node, not a constant initializer"
    if name in context.inputs and name in context.initializers:
        return (f"{role} '{name}' is an initializer that is also a graph input (it can be overridden at run time), "
                "not a constant initializer")
    return f"{role} '{name}' is not a constant initializer"


def _float16_reason(w: np.ndarray, d: int, scale: str) -> str | None:
    """Why float16 scales cannot carry this weight, or None (see the module docstring)."""
    slices = to_slices(w, d)  # (N, s, D)
    mag = np.abs(slices).mean(axis=2, dtype=np.float64)  # (N, s): the magnitude a scale takes
    count = slices.shape[2]
    if scale == "filter":
        mag, count = mag.mean(axis=1), count * slices.shape[1]
    if mag.max() > F16_MAX:
        return (f"weights too large for float16 scales (a {scale}'s mean |w| reaches {mag.max():.3g}, "
                f"float16 holds {F16_MAX:g})")
    stored = mag.astype(np.float16).astype(np.float64)
    loss = np.sqrt(count * np.sum((mag - stored) ** 2) / np.sum(w.astype(np.float64) ** 2))
    if loss > F16_LOSS:
        return (f"weights too small for float16 scales (largest |w| {np.abs(w).max():.3g}): rounding the scales "
                f"would lose {loss:.0%} of the weight")
    return None
