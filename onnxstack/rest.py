"""What compression leaves float, stored int8 per output channel (`--rest int8`): a graph pass after the rewrite.

Every float32 initializer of the main graph that is worth it (at least MIN_ELEMENTS values, rank 2 or more)
and that one node reads as a weight whose output-channel axis is known becomes

    q (int8), s (float32, one a channel)  ->  DequantizeLinear(q, s, axis)  ->  the original value name,

W_hat = s * q along that axis, symmetric, round to nearest with the per-channel clipping of
core.intq.quantize_weights (zero point 0, not stored). The readers keep their inputs (the dequantized value
takes the initializer's name). Weights this covers: Conv layers left dense or skipped by compression
(depthwise and grouped ones included), ConvTranspose (group 1), Gemm and MatMul weights that were not lifted,
and the input and recurrent weights of LSTM, GRU and RNN (a scale per gate row, shared by both directions).

Left float, each with its reason in the record: biases and other vectors, small tensors, an initializer
several nodes (or a subgraph, or a graph output) read, one a node reads where no output-channel axis is
clear (Add, Mul, Gather, a Gemm's A or C, ...), initializers that are graph inputs, non-finite values,
values float32 scales cannot carry, and everything below opset 13 (DequantizeLinear has no axis there).

The record (the report's `rest` entry) lists what was stored (name, consumer, axis, bytes before/after,
relative weight error) and what was not, and why. Bytes are those of the tensors (float32: 4 a value;
int8: 1 a value, plus 4 a channel scale); the file ratio counts the file itself.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .core.intq import decode, quantize_weights
from .graphs import FreshNames, replace_nodes, subgraph_reads, taken_names

MODES = ("float", "int8")
MIN_ELEMENTS = 1024  # smaller tensors stay float: their scales and the node would eat most of the saving
MIN_OPSET = 13  # DequantizeLinear with a per-axis scale


def store_rest(model: onnx.ModelProto, mode: str) -> dict:
    """Store the model's remaining float weights as `mode` says, in place; the record of what was done."""
    if mode not in MODES:
        raise ValueError(f"rest must be one of {MODES}, got {mode!r}")
    record = {"mode": mode}
    if mode == "float":
        return record
    graph = model.graph
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    readers = _readers(graph)
    blocked = subgraph_reads(graph) | {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    fresh = FreshNames(taken_names(graph) | {n.name for n in graph.node})
    touched, skipped, small = [], [], {"tensors": 0, "bytes": 0}
    dequantize: dict[int, list[onnx.NodeProto]] = {}  # node index -> DequantizeLinear nodes to put in front of it
    drop: set[str] = set()
    for tensor in list(graph.initializer):
        if tensor.data_type != TensorProto.FLOAT:
            continue
        size = int(np.prod(tensor.dims, dtype=np.int64))
        if len(tensor.dims) < 2 or size < MIN_ELEMENTS:
            small["tensors"] += 1
            small["bytes"] += 4 * size
            continue
        entry = {"name": tensor.name, "shape": list(tensor.dims), "bytes": 4 * size}
        why, axis, index = _why_not(tensor, readers, blocked, inputs, opset, graph)
        if why is None:
            w = numpy_helper.to_array(tensor)
            why = _values_reason(w)
        if why is None:
            q, s, err = _quantize(w, axis)
            why = None if np.isfinite(s).all() and (s > 0).all() else "a channel scale underflows float32"
        if why is not None:
            skipped.append({**entry, "reason": why})
            continue
        node = graph.node[index]
        names = {role: fresh(f"{tensor.name}.{role}") for role in ("quantized", "scale")}
        graph.initializer.extend([numpy_helper.from_array(q, names["quantized"]),
                                  numpy_helper.from_array(s, names["scale"])])
        dequantize.setdefault(index, []).append(helper.make_node(
            "DequantizeLinear", [names["quantized"], names["scale"]], [tensor.name],
            name=fresh(f"{tensor.name}.DequantizeLinear"), axis=axis))
        drop.add(tensor.name)
        touched.append({**entry, "consumer": node.name or node.output[0], "op": node.op_type, "axis": axis,
                        "channels": int(s.size), "bytes_after": q.nbytes + s.nbytes, "weight_rel_error": err})
    if drop:
        for k in reversed(range(len(graph.initializer))):
            if graph.initializer[k].name in drop:
                del graph.initializer[k]
        replace_nodes(graph, [n for i, node in enumerate(graph.node) for n in (*dequantize.get(i, ()), node)])
    before = sum(e["bytes"] for e in touched)
    after = sum(e["bytes_after"] for e in touched)
    record.update({"min_elements": MIN_ELEMENTS, "touched": touched, "skipped": skipped, "small_left_float": small,
                   "bytes_before": before, "bytes_after": after})
    return record


def _readers(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int]]]:
    """value name -> (node index, input position) of every main-graph node input that reads it."""
    out: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((i, pos))
    return out


def _why_not(tensor, readers, blocked, inputs, opset, graph) -> tuple[str | None, int | None, int | None]:
    """(reason it stays float, or None; the output-channel axis; the reading node's index)."""
    name = tensor.name
    if opset < MIN_OPSET:
        return f"per-channel DequantizeLinear needs opset >= {MIN_OPSET}, the model has {opset}", None, None
    if name in inputs:
        return "also a graph input (it can be overridden at run time)", None, None
    if tensor.data_location == TensorProto.EXTERNAL:
        return "its data is external and was not loaded", None, None
    if name in blocked:
        return "read inside a subgraph or a graph output", None, None
    reads = readers.get(name, [])
    if not reads:
        return "no node reads it", None, None
    nodes = sorted({i for i, _ in reads})
    if len(reads) > 1:
        who = ", ".join(f"{graph.node[i].op_type} '{graph.node[i].name}'" for i in nodes[:4])
        return f"read {len(reads)} times ({who}); one output-channel axis cannot serve them all", None, None
    index, pos = reads[0]
    node = graph.node[index]
    axis, why = output_axis(node, pos, len(tensor.dims))
    return why, axis, index


def output_axis(node: onnx.NodeProto, pos: int, rank: int) -> tuple[int | None, str | None]:
    """The output-channel axis of a weight that `node` reads at input `pos`, or the reason there is none."""
    where = f"read by {node.op_type} '{node.name or node.output[0]}' as input {pos}"
    if node.domain not in ("", "ai.onnx"):
        return None, f"{where} (domain {node.domain}): no known output-channel axis"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv" and pos == 1:
        return 0, None
    if node.op_type == "ConvTranspose" and pos == 1:
        if attrs.get("group", 1) != 1:
            return None, f"{where}: grouped ConvTranspose, its output channels span two weight axes"
        return 1, None
    if node.op_type == "Gemm" and pos == 1:
        return (0 if attrs.get("transB", 0) else 1), None
    if node.op_type == "MatMul" and pos == 1:
        return rank - 1, None
    if node.op_type in ("LSTM", "GRU", "RNN") and pos in (1, 2) and rank == 3:
        return 1, None  # W and R: (directions, gates x hidden, inputs); a scale per gate row, both directions
    return None, f"{where}: no output-channel axis"


def _values_reason(w: np.ndarray) -> str | None:
    if not np.isfinite(w).all():
        return "holds NaN or Inf"
    return None


def _quantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, float]:
    """int8 values (w's shape), float32 scales (one along `axis`), and the relative error of the decode."""
    moved = np.moveaxis(w, axis, 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # an underflowing scale is refused after
        q, s = quantize_weights(moved, 8)
    w_hat = decode(q, s)
    norm = float(np.linalg.norm(moved.astype(np.float64)))
    err = float(np.linalg.norm((w_hat - moved).astype(np.float64)) / norm) if norm > 0 else 0.0
    return np.ascontiguousarray(np.moveaxis(q, 0, axis)), s.astype(np.float32), err
