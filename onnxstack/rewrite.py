"""Rewriting the graph: `canonical` before analysis, and each planned Conv becomes a StackedBinaryConv
node in place (`rewrite`) after planning.

`canonical` gives analysis one form of each graph: Conv weights held by Constant nodes become
initializers, 1-D Convs become 2-D Convs (kernel 1 x k) between Unsqueeze and Squeeze, and declared
intermediate shapes that inference contradicts are dropped. Outputs are unchanged.

The new model keeps every other node, name, input and output; it carries the op's function
definitions, imports com.onnxstack, and records the config in metadata_props. Weight tensors
that nothing else reads are dropped; a weight shared by several compressed Convs is stored once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from . import op
from .analyse import ConvInfo
from .core.bits import index_dtype, pack_codebook
from .errors import ModelError, OnnxstackError
from .load import checkable, undeclared
from .plan import LayerPlan

MIN_IR_VERSION = 10  # function overloads


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default ONNX opset")


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to `target` opset by onnx's version converter (caller checks outputs)."""
    try:
        return version_converter.convert_version(model, target)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise ModelError(f"cannot upgrade opset {default_opset(model)} to {target}, "
                         f"which StackedBinaryConv needs: {' '.join(str(e).split())[:200]}") from None


def plan_tensors(plan: LayerPlan) -> dict[str, object]:
    """The stored tensors of one plan, by role (numpy arrays in their stored dtypes)."""
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


def _check_finite(plan: LayerPlan, values, stored, role: str) -> None:
    """A NaN or Inf (or a value past float16) in what is stored would silently break the model: refuse it."""
    bad = int(np.size(stored) - np.isfinite(stored).sum())
    if bad or not np.isfinite(values).all():
        raise OnnxstackError(f"layer '{plan.name}': {max(bad, 1)} fitted {role} value(s) are NaN or Inf, or exceed "
                             f"{np.asarray(stored).dtype}; leave the layer dense (--skip {plan.name})")


def _squeeze(a):
    """(N, s, 1) -> (N, s): one term a slice is stored in the paper's rank-2 form."""
    return a[:, :, 0] if a.shape[2] == 1 else a


def tensor_names(plan: LayerPlan) -> dict[str, str]:
    """Initializer names of a plan's stored tensors, derived from the weight's name."""
    roles = ("codebook", "indices", "scales") + (("bias",) if plan.bias is not None else ())
    return {role: f"{plan.weight_name}.{role}" for role in roles}


def rewrite(model: onnx.ModelProto, layers: list[tuple[ConvInfo, LayerPlan]], metadata: dict[str, str]) -> onnx.ModelProto:
    """A new model with each (info, plan) Conv replaced. `model` must already have opset >= op.MIN_OPSET."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = default_opset(out)
    taken = {t.name for t in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
    written: dict[str, dict[str, str]] = {}
    for info, plan in layers:
        key = f"{plan.weight_name}|{id(plan)}"
        if key not in written:
            names = _unique(tensor_names(plan), taken)
            for role, arr in plan_tensors(plan).items():
                graph.initializer.append(numpy_helper.from_array(arr, names[role]))
            written[key] = names
        names = written[key]
        node = graph.node[info.node_index]
        inputs = [node.input[0], names["codebook"], names["indices"], names["scales"]]
        if "bias" in names:
            inputs.append(names["bias"])
        elif info.bias_name:
            inputs.append(info.bias_name)
        new = op.make_node(inputs, node.output[0], node.name, plan.execution, plan.shape[1], info.attrs)
        graph.node[info.node_index].CopyFrom(new)
    _drop_unused_initializers(graph, {p.weight_name for _, p in layers} | {i.bias_name for i, _ in layers if i.bias_name})
    forms = sorted({p.execution for _, p in layers})
    del out.functions[:]
    out.functions.extend([f for f in model.functions if f.domain != op.DOMAIN])
    out.functions.extend(op.make_function(form, opset) for form in forms)
    if not any(i.domain == op.DOMAIN for i in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(op.DOMAIN, op.VERSION))
    out.ir_version = max(out.ir_version, MIN_IR_VERSION)
    existing = {p.key for p in out.metadata_props}
    for k, v in metadata.items():
        if k in existing:
            next(p for p in out.metadata_props if p.key == k).value = v
        else:
            out.metadata_props.add(key=k, value=v)
    return out


def _unique(names: dict[str, str], taken: set[str]) -> dict[str, str]:
    out = {}
    for role, name in names.items():
        candidate, k = name, 1
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        out[role] = candidate
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of the graph or its subgraphs, and the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= _used_names(sub)
    return used


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    dead = candidates - _used_names(graph)
    for field in (graph.initializer, graph.input, graph.value_info):
        for k in reversed(range(len(field))):  # in place: re-adding a tensor past 2 GB would fail
            if field[k].name in dead:
                del field[k]


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model (changed in place) in the form analysis expects; outputs are unchanged.

    - Constant nodes of the main graph whose value a Conv reads as weight or bias become initializers.
    - A 1-D Conv with a constant float weight that only 1-D Convs read becomes Unsqueeze(axis 2) ->
      2-D Conv (weight (N, C, 1, k), attributes extended with the unit axis) -> Squeeze(axis 2); the
      Conv keeps its name, so configs and reports address it as before.
    - Declared intermediate shapes (value_info) are dropped when inference contradicts them.
    """
    if model.ir_version >= 4:
        _constants_to_initializers(model.graph)
    _lift_conv1d(model)
    _drop_contradicted_value_info(model)
    return model


def _drop_contradicted_value_info(model: onnx.ModelProto) -> None:
    """Declared intermediate shapes that inference contradicts (onnxruntime ignores them) are dropped,
    so that the compressed model passes the full checker."""
    if not model.graph.value_info:
        return
    try:
        with checkable(model) as (proto, _):
            onnx.shape_inference.infer_shapes(undeclared(proto, value_info=False), check_type=True,
                                              strict_mode=True)
    except Exception:  # noqa: BLE001 - some declared shape disagrees with the operators
        del model.graph.value_info[:]


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    conv_params = {n.input[i] for n in graph.node if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
                   for i in (1, 2) if len(n.input) > i and n.input[i]}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None \
                and node.output[0] in conv_params and node.output[0] not in outputs:
            tensor = graph.initializer.add()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        _replace_nodes(graph, keep)


def _lift_conv1d(model: onnx.ModelProto) -> None:
    graph = model.graph
    inputs = {i.name for i in graph.input}
    weights = {t.name: t for t in graph.initializer if t.name not in inputs}
    readers: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    sub_reads = _subgraph_reads(graph)

    def liftable(node):
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        return (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and w is not None and len(w.dims) == 3
                and w.data_type == TensorProto.FLOAT)

    lift = [n for n in graph.node if liftable(n)]
    outputs = {o.name for o in graph.output}
    lift = [n for n in lift if n.input[1] not in sub_reads and n.input[1] not in outputs
            and all(liftable(r) and k == 1 for r, k in readers[n.input[1]])]
    if not lift:
        return
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 13)
    taken = {t.name for t in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)} \
        | {i.name for i in graph.input}
    fresh = _Fresh(taken)
    axes = None
    if opset >= 13:
        axes = fresh("onnxstack_axis2")
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), axes))
    lifted = {n.input[1] for n in lift}
    for name in sorted(lifted):
        weights[name].dims.insert(2, 1)  # (N, C, k) -> (N, C, 1, k); the data does not move
    stale = [v for v in graph.value_info if v.name in lifted]
    for v in stale:
        graph.value_info.remove(v)
    targets = {id(n) for n in lift}
    nodes = []
    for node in graph.node:
        if id(node) not in targets:
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        x2, y2 = fresh(f"{node.input[0]}_2d"), fresh(f"{node.output[0]}_2d")
        unsq = _axis_node("Unsqueeze", node.input[0], x2, axes, f"{base}/unsqueeze", fresh)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[0], conv.output[0] = x2, y2
        _lift_attributes(conv)
        sq = _axis_node("Squeeze", y2, node.output[0], axes, f"{base}/squeeze", fresh)
        nodes.extend([unsq, conv, sq])
    _replace_nodes(graph, nodes)


def _axis_node(op_type, x, y, axes, name, fresh):
    if axes is not None:
        return helper.make_node(op_type, [x, axes], [y], name=fresh(name))
    return helper.make_node(op_type, [x], [y], name=fresh(name), axes=[2])


def _lift_attributes(conv: onnx.NodeProto) -> None:
    """Conv attributes of one spatial axis extended by a leading unit axis (kernel 1, stride 1, no pad)."""
    for attr in conv.attribute:
        if attr.name in ("kernel_shape", "strides", "dilations"):
            attr.ints.insert(0, 1)
        elif attr.name == "pads" and len(attr.ints) == 2:
            begin, end = attr.ints
            del attr.ints[:]
            attr.ints.extend([0, begin, 0, end])


class _Fresh:
    """Value and node names not used yet in the graph."""

    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def __call__(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.taken:
            candidate, k = f"{name}_{k}", k + 1
        self.taken.add(candidate)
        return candidate


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    reads: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for n in sub.node:
                    reads.update(n.input)
                reads |= _subgraph_reads(sub)
    return reads


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)
