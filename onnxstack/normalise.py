"""Stage 1 of the pipeline: the model in the one form analysis expects. Outputs never change.

- Constant nodes whose value a Conv (or Gemm, MatMul) reads as weight or bias become initializers, and
  so do constant chains (Identity, Cast, Reshape, Transpose, Squeeze, Unsqueeze, Flatten of initializers)
  that feed one: torch.onnx.export shares equal initializers through Identity nodes.
- A 1-D Conv with a constant float weight that only 1-D Convs read becomes Unsqueeze(axis 2) ->
  2-D Conv (weight (N, C, 1, k), attributes extended with the unit axis) -> Squeeze(axis 2); the
  Conv keeps its name, so configs and reports address it as before.
- A fully connected layer (Gemm, or MatMul of a rank-2 input) with a constant 2-D weight becomes
  Unsqueeze -> Conv 1x1 -> Squeeze in the same way, so it is compressed like a Conv.
- Declared intermediate shapes (value_info) are dropped when inference contradicts them, and so is each one
  that fixes a dim inference from the graph inputs leaves free (a batch of 1 declared inside a model whose
  input batch is dynamic): onnxruntime folds Shape on declared dims, and the custom op reads Shape.
- A model below the op's opset is upgraded, and the upgrade proven on a random input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from . import op
from .errors import ModelError, one_line
from .graphs import FreshNames, replace_nodes, subgraph_reads
from .load import checkable, undeclared

FOLDABLE = ("Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """canonical(model), upgraded to op.MIN_OPSET when below it (proven on a random input)."""
    model = canonical(model)
    if default_opset(model) < op.MIN_OPSET:
        model = upgrade_checked(model)
    return model


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model (changed in place) in the form analysis expects (see the module docstring)."""
    if model.ir_version >= 4:
        _constants_to_initializers(model.graph)
        fold_constant_params(model)
    _lift_conv1d(model)
    if model.ir_version >= 4:
        _lift_linear(model)
    _drop_contradicted_value_info(model)
    return model


def _drop_contradicted_value_info(model: onnx.ModelProto) -> None:
    """Declared intermediate shapes that inference contradicts (onnxruntime ignores them) are dropped,
    so that the compressed model passes the full checker; so are those that pin a dim which inference
    from the graph inputs alone leaves free or does not reach (see _pinned)."""
    if not model.graph.value_info:
        return
    try:
        with checkable(model) as (proto, _):
            onnx.shape_inference.infer_shapes(undeclared(proto, value_info=False), check_type=True,
                                              strict_mode=True)
            inferred = onnx.shape_inference.infer_shapes(undeclared(proto))
    except Exception:  # noqa: BLE001 - some declared shape disagrees with the operators
        del model.graph.value_info[:]
        return
    proven = {vi.name: _dims(vi) for vi in inferred.graph.value_info}
    for vi in [vi for vi in model.graph.value_info if _pinned(_dims(vi), proven.get(vi.name))]:
        model.graph.value_info.remove(vi)


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    """A value's dims (an int where fixed, None where free), or None when it declares no shape."""
    t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if t is None or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _pinned(declared: list | None, proven: list | None) -> bool:
    """True where a declared shape fixes a dim that inference from the inputs does not prove: its rank
    differs, inference left the dim free, or inference did not reach the value at all."""
    if declared is None or all(d is None for d in declared):
        return False
    if proven is None or len(proven) != len(declared):
        return True
    return any(d is not None and d != p for d, p in zip(declared, proven))


def _keep_interface(converted: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The version converter re-infers shapes; the graph's declared inputs and outputs, and its declared
    intermediate shapes, stay the original's (an output must not gain a fixed batch)."""
    for field in ("input", "output"):
        mine = {vi.name: vi for vi in getattr(original.graph, field)}
        for vi in getattr(converted.graph, field):
            if vi.name in mine:
                vi.type.CopyFrom(mine[vi.name].type)
    names = {vi.name for vi in original.graph.value_info}
    for vi in [vi for vi in converted.graph.value_info if vi.name not in names]:
        converted.graph.value_info.remove(vi)
    return converted


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    conv_params = {n.input[i] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                   and n.domain in ("", "ai.onnx") for i in (1, 2) if len(n.input) > i and n.input[i]}
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
        replace_nodes(graph, keep)


def _lift_conv1d(model: onnx.ModelProto) -> None:
    graph = model.graph
    inputs = {i.name for i in graph.input}
    weights = {t.name: t for t in graph.initializer if t.name not in inputs}
    readers: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    sub_reads = subgraph_reads(graph)

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
    fresh = FreshNames(taken)
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
    replace_nodes(graph, nodes)


def _lift_linear(model: onnx.ModelProto) -> None:
    """Gemm (alpha = beta = 1, transA = 0, a 1-D or no bias) and MatMul of a rank-2 input with a constant 2-D
    float weight that no other node reads become Unsqueeze(axes 2, 3) -> Conv 1x1 (weight (N, K, 1, 1))
    -> Squeeze(axes 2, 3): the same product, which the Conv machinery then compresses like any layer. The
    Conv keeps the node's name."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    weights = {t.name: t for t in graph.initializer if t.name not in inputs}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    blocked = subgraph_reads(graph) | {o.name for o in graph.output}
    rank2 = _rank2_values(model)

    def lift(node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            return None
        w = weights.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT or readers[w.name] != 1 \
                or w.name in blocked:
            return None
        if node.op_type == "MatMul":
            return (False, None) if node.input[0] in rank2 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            b = weights.get(bias)
            n_out = w.dims[0] if attrs.get("transB", 0) else w.dims[1]
            if b is None or list(b.dims) != [n_out] or readers[bias] != 1:
                return None
        return bool(attrs.get("transB", 0)), bias

    plans = [lift(n) for n in graph.node]
    if all(v is None for v in plans):
        return
    fresh = FreshNames({t.name for t in graph.initializer} | {i.name for i in graph.input}
                       | {v for n in graph.node for v in (*n.input, *n.output)})
    axes = None
    if default_opset(model) >= 13:
        axes = fresh("onnxstack_axes23")
        graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
    nodes = []
    lifted = {graph.node[i].input[1] for i, p in enumerate(plans) if p is not None}
    for index, (node, plan) in enumerate(zip(graph.node, plans)):
        if plan is None:
            nodes.append(node)
            continue
        trans_b, bias = plan
        w = weights[node.input[1]]
        if trans_b:
            w.dims.extend([1, 1])  # (N, K) -> (N, K, 1, 1); the data does not move
        else:  # (K, N): the Conv wants (N, K, 1, 1)
            w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T)[:, :, None, None],
                                               w.name))
        base = node.name or node.output[0]
        x4, y4 = fresh(f"{node.input[0]}_4d"), fresh(f"{node.output[0]}_4d")
        name = node.name or fresh(f"{node.op_type}_{index}")  # an unnamed layer keeps its name of the input model
        conv = helper.make_node("Conv", [x4, w.name] + ([bias] if bias else []), [y4], name=name, kernel_shape=[1, 1])
        nodes += [_axes_node("Unsqueeze", node.input[0], x4, axes, f"{base}/unsqueeze", fresh), conv,
                  _axes_node("Squeeze", y4, node.output[0], axes, f"{base}/squeeze", fresh)]
    for v in [v for v in graph.value_info if v.name in lifted]:
        graph.value_info.remove(v)
    replace_nodes(graph, nodes)


def _axes_node(op_type, x, y, axes, name, fresh):
    if axes is not None:
        return helper.make_node(op_type, [x, axes], [y], name=fresh(name))
    return helper.make_node(op_type, [x], [y], name=fresh(name), axes=[2, 3])


def _rank2_values(model: onnx.ModelProto) -> set[str]:
    """Values that shape inference gives rank 2 (MatMul is a plain product only on those)."""
    from .load import skeleton

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model)[0])
    except Exception:  # noqa: BLE001 - unknown ranks: no MatMul is lifted
        return set()
    return {vi.name for vi in (*inferred.graph.input, *inferred.graph.value_info)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
            and len(vi.type.tensor_type.shape.dim) == 2}


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


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default ONNX opset")


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to `target` opset by onnx's version converter (caller checks outputs)."""
    try:
        return _keep_interface(version_converter.convert_version(model, target), model)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise ModelError(f"cannot upgrade opset {default_opset(model)} to {target}, "
                         f"which StackedBinaryConv needs: {one_line(e, 200)}") from None


def upgrade_checked(model: onnx.ModelProto, target: int = op.MIN_OPSET) -> onnx.ModelProto:
    """Upgrade to `target` (op.MIN_OPSET unless told) and prove on a random input that the outputs did not
    change."""
    from .runtime import open_session, random_inputs

    upgraded = upgrade_opset(model, target)
    try:
        sessions = open_session(model), open_session(upgraded)
        for size in (None, 64, 224, 1024):  # sizes for the free dims, until the original model runs
            feeds = random_inputs(model, size=size)
            try:
                before = sessions[0].run(None, feeds)
                break
            except Exception:  # noqa: BLE001 - this size does not fit the model; try the next
                if size == 1024:
                    raise
        after = sessions[1].run(None, feeds)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot verify the opset upgrade to {target}: {one_line(e, 200)}") from None
    for a, b in zip(before, after):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise ModelError(f"upgrading opset {default_opset(model)} to {target} changed the outputs; "
                             f"export the model at opset >= {target}")
    return upgraded


def fold_constant_params(model: onnx.ModelProto) -> None:
    """Conv weights and biases computed from initializers by FOLDABLE nodes become initializers (in place).

    The chain is evaluated by onnx's reference evaluator; a folded value keeps its name, and the nodes
    nothing reads any more are dropped."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    consts = {t.name: t for t in graph.initializer if t.name not in inputs}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    targets = [n.input[i] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.domain in ("", "ai.onnx")
               for i in (1, 2) if len(n.input) > i and n.input[i]]
    sub_reads = subgraph_reads(graph)
    folded: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(targets):
        if name in consts or name in outputs or name in sub_reads:
            continue
        chain = _constant_chain(name, producer, consts)
        if chain is None:
            continue
        try:
            folded[name] = _evaluate(chain, name, consts, model)
        except Exception:  # noqa: BLE001 - left as it is; analysis then gives the reason
            continue
    if not folded:
        return
    drop = {id(producer[name]) for name in folded}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
    replace_nodes(graph, [n for n in graph.node if id(n) not in drop])
    _drop_dead_nodes(graph)


def _constant_chain(name, producer, consts) -> list[onnx.NodeProto] | None:
    """The FOLDABLE nodes (in graph order of discovery, producers first) computing `name` from initializers."""
    node = producer.get(name)
    if node is None or node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    chain: list[onnx.NodeProto] = []
    for x in node.input:
        if not x or x in consts:
            continue
        sub = _constant_chain(x, producer, consts)
        if sub is None:
            return None
        chain.extend(n for n in sub if all(n is not c for c in chain))
    return chain + [node]


def _evaluate(chain, name, consts, model) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    needed = {x for n in chain for x in n.input if x in consts}
    graph = helper.make_graph(list(chain), "fold", [], [helper.make_empty_tensor_value_info(name)],
                              [consts[x] for x in sorted(needed)])
    small = helper.make_model(graph, opset_imports=[i for i in model.opset_import if i.domain in ("", "ai.onnx")],
                              ir_version=model.ir_version)
    return np.asarray(ReferenceEvaluator(small).run(None, {})[0])


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes without side effects whose outputs nothing reads (repeatedly, for chains)."""
    from .graphs import used_names

    while True:
        used = used_names(graph)
        keep = [n for n in graph.node if n.op_type not in FOLDABLE or any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
        replace_nodes(graph, keep)
