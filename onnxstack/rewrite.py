"""The rewrite stage: each planned Conv becomes a StackedBinaryConv node in place, or, for an integer
plan, keeps its Conv and reads its weight from DequantizeLinear(q, scale, axis=0) of stored int8 / int4
values (zero point 0, not stored), W_hat = scale[:, None, None, None] * q; a corrected bias replaces the
Conv's bias.

The new model keeps every other node, name, input and output; it carries the op's function
definitions (when a layer is binary), imports com.onnxstack, and records the config in metadata_props.
Weight tensors that nothing else reads are dropped; a weight shared by several compressed Convs is
stored once (and, for an integer plan, dequantized by one node).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from . import op
from .analyse import ConvInfo
from .core.bits import index_dtype, pack_codebook, pack_int4
from .errors import OnnxstackError
from .graphs import FreshNames, replace_nodes, used_names
from .normalise import default_opset
from .plan import IntPlan, LayerPlan

MIN_IR_VERSION = 10  # function overloads


def plan_tensors(plan: LayerPlan | IntPlan) -> dict[str, object]:
    """The stored tensors of one plan, by role (numpy arrays in their stored dtypes; int4 values as int8)."""
    if isinstance(plan, IntPlan):
        return _int_tensors(plan)
    _, _, kh, kw = plan.shape
    out = {
        "codebook": pack_codebook(plan.fit.codebook, (plan.slice_dim, kh, kw)),
        "indices": _squeeze(plan.fit.indices).astype(index_dtype(plan.codebook_size)),
        "scales": _squeeze(plan.fit.scales).astype("float16"),
    }
    if plan.bias is not None:
        out["bias"] = plan.bias.astype("float32")
    _check_finite(plan, plan.fit.scales, out["scales"], "scales")
    if plan.bias is not None:
        _check_finite(plan, plan.bias, out["bias"], "bias")
    return out


def _int_tensors(plan: IntPlan) -> dict[str, object]:
    out = {"quantized": plan.values.astype(np.int8), "scale": plan.scales.astype(np.float32)}
    _check_finite(plan, plan.scales, out["scale"], "scale")
    if plan.bias is not None:
        out["bias"] = plan.bias.astype(np.float32)
        _check_finite(plan, plan.bias, out["bias"], "bias")
    return out


def _initializer(arr: np.ndarray, name: str, int4: bool) -> onnx.TensorProto:
    """An initializer; int4=True stores int8 values in [-8, 7] as packed INT4."""
    if not int4:
        return numpy_helper.from_array(arr, name)
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=arr.shape)
    t.raw_data = pack_int4(arr)
    return t


def _check_finite(plan: LayerPlan | IntPlan, values, stored, role: str) -> None:
    """A NaN or Inf (or a value past float16) in what is stored would silently break the model: refuse it."""
    bad = int(np.size(stored) - np.isfinite(stored).sum())
    if bad or not np.isfinite(values).all():
        raise OnnxstackError(f"layer '{plan.name}': {max(bad, 1)} fitted {role} value(s) are NaN or Inf, or exceed "
                             f"{np.asarray(stored).dtype}; leave the layer dense (--skip {plan.name})")


def _squeeze(a):
    """(N, s, 1) -> (N, s): one term a slice is stored in the paper's rank-2 form."""
    return a[:, :, 0] if a.shape[2] == 1 else a


def tensor_names(plan: LayerPlan | IntPlan) -> dict[str, str]:
    """Initializer names of a plan's stored tensors (and an integer plan's dequantized weight and node),
    derived from the weight's name."""
    if isinstance(plan, IntPlan):
        roles = ("quantized", "scale") + (("bias",) if plan.bias is not None else ()) + ("dequantized",)
        return {**{role: f"{plan.weight_name}.{role}" for role in roles},
                "node": f"{plan.weight_name}.DequantizeLinear"}
    roles = ("codebook", "indices", "scales") + (("bias",) if plan.bias is not None else ())
    return {role: f"{plan.weight_name}.{role}" for role in roles}


def rewrite(model: onnx.ModelProto, layers: list[tuple[ConvInfo, LayerPlan | IntPlan]],
            metadata: dict[str, str]) -> onnx.ModelProto:
    """A new model with each (info, plan) Conv replaced. `model` must already have opset >= op.MIN_OPSET
    (and >= 13 for integer plans, >= 21 for int4 ones)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = default_opset(out)
    fresh = FreshNames({t.name for t in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
                       | {n.name for n in graph.node})
    written: dict[str, dict[str, str]] = {}
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> DequantizeLinear nodes to put in front of it
    for info, plan in layers:
        key = f"{plan.weight_name}|{id(plan)}"
        if key not in written:
            names = {role: fresh(name) for role, name in tensor_names(plan).items()}
            int4 = isinstance(plan, IntPlan) and plan.int_bits == 4
            for role, arr in plan_tensors(plan).items():
                graph.initializer.append(_initializer(arr, names[role], int4 and role == "quantized"))
            if isinstance(plan, IntPlan):
                before.setdefault(info.node_index, []).append(onnx.helper.make_node(
                    "DequantizeLinear", [names["quantized"], names["scale"]], [names["dequantized"]],
                    name=names["node"], axis=0))
            written[key] = names
        names = written[key]
        node = graph.node[info.node_index]
        if isinstance(plan, IntPlan):
            _read_int_weight(node, info, names)
            continue
        inputs = [node.input[0], names["codebook"], names["indices"], names["scales"]]
        if "bias" in names:
            inputs.append(names["bias"])
        elif info.bias_name:
            inputs.append(info.bias_name)
        new = op.make_node(inputs, node.output[0], node.name, plan.execution, plan.shape[1], info.attrs,
                           slice_dim=plan.slice_dim)
        graph.node[info.node_index].CopyFrom(new)
    if before:
        replace_nodes(graph, [n for i, node in enumerate(graph.node) for n in (*before.get(i, ()), node)])
    _drop_unused_initializers(graph, {p.weight_name for _, p in layers} | {i.bias_name for i, _ in layers if i.bias_name})
    overloads = sorted({n.overload for n in graph.node if n.domain == op.DOMAIN and n.op_type == op.OP_TYPE})
    del out.functions[:]
    out.functions.extend([f for f in model.functions if f.domain != op.DOMAIN])
    out.functions.extend(op.make_function(name, opset) for name in overloads)
    if overloads and not any(i.domain == op.DOMAIN for i in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(op.DOMAIN, op.VERSION))
    out.ir_version = max(out.ir_version, MIN_IR_VERSION)
    existing = {p.key for p in out.metadata_props}
    for k, v in metadata.items():
        if k in existing:
            next(p for p in out.metadata_props if p.key == k).value = v
        else:
            out.metadata_props.add(key=k, value=v)
    return out


def _read_int_weight(node: onnx.NodeProto, info: ConvInfo, names: dict[str, str]) -> None:
    """The Conv reads its weight from the DequantizeLinear output, its bias from the corrected one if any."""
    node.input[1] = names["dequantized"]
    if "bias" in names:
        if len(node.input) > 2:
            node.input[2] = names["bias"]
        else:
            node.input.append(names["bias"])


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    dead = candidates - used_names(graph)
    for field in (graph.initializer, graph.input, graph.value_info):
        for k in reversed(range(len(field))):  # in place: re-adding a tensor past 2 GB would fail
            if field[k].name in dead:
                del field[k]


