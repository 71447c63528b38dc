"""Reconstruction blocks of a compressed graph, found from its structure alone (no torch, no shapes).

A *cut* is a point in the node order where exactly one non-constant value is live (produced so far
and still read later): everything after it depends on the model's inputs only through that value.
The nodes between two cuts form an *atom*: one node of a chain, or a whole residual block (the skip
path keeps two values live from the block input to the merging Add, so no cut falls inside).

    block = an atom holding compressed convs, plus the elementwise activations right after it
            (Conv -> Relu in a chain; Conv, Relu, Conv, [shortcut Conv], Add -> Relu in a ResNet)

An atom with more than `max_layers` compressed convs (a U-Net's long skips, a graph whose shape
values stay live) falls back to single-layer blocks: each compressed conv and the elementwise
activations that alone read its output. A block's target is the original model's value of the
same name at the block's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .. import op as sbc

# ops that map one tensor to one tensor of the same shape, elementwise or per channel (other inputs constant)
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Gelu", "Mish", "Swish", "ThresholdedRelu", "BatchNormalization", "Add", "Sub", "Mul", "Div",
})


@dataclass(frozen=True)
class Block:
    """Nodes (positions in the graph's node list) fitted together to reproduce the original `output`.

    inputs: the non-constant values the nodes read from outside the block; layers: the names of its
    StackedBinaryConv nodes; kind: "block" (between two cuts) or "layer" (single-layer fallback)."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    output: str
    layers: tuple[str, ...]
    kind: str

    @property
    def name(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else f"{self.layers[0]}..{self.layers[-1]}"


def find_blocks(model: onnx.ModelProto, *, max_layers: int = 8, group: int = 1) -> list[Block]:
    """The reconstruction blocks of a compressed model, in graph order; with group > 1, runs of
    consecutive cut-to-cut blocks are merged (with the nodes between them) until each holds at least
    `group` compressed convs (the last may hold fewer), so a chain CNN gets multi-layer blocks."""
    graph = model.graph
    nodes = list(graph.node)
    const = _constants(graph)
    used = _last_use(graph, const)
    blocks: list[Block] = []
    atoms = _atoms(graph, const, used)
    i = 0
    while i < len(atoms):
        atom = atoms[i]
        layers = [p for p in atom if _compressed(nodes[p])]
        i += 1
        if not layers:
            continue
        if len(layers) > max_layers:
            blocks += [_layer_block(nodes, p, atom, const) for p in layers]
            continue
        span = list(atom)
        while i < len(atoms) and len(atoms[i]) == 1 and _elementwise(nodes[atoms[i][0]], const):
            span += atoms[i]
            i += 1
        blocks.append(_block(nodes, span, const, "block"))
    return _grouped(nodes, blocks, const, group) if group > 1 else blocks


def _grouped(nodes: list[onnx.NodeProto], blocks: list[Block], const: set[str], group: int) -> list[Block]:
    out: list[Block] = []
    run: list[Block] = []
    for block in [*blocks, None]:
        if run and (block is None or block.kind != "block" or sum(len(b.layers) for b in run) >= group):
            span = list(range(run[0].nodes[0], run[-1].nodes[-1] + 1))
            out.append(_block(nodes, span, const, "block") if len(run) > 1 else run[0])
            run = []
        if block is not None and block.kind != "block":
            out.append(block)
        elif block is not None:
            run.append(block)
    return out


# --- graph analysis ------------------------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {""}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _last_use(graph: onnx.GraphProto, const: set[str]) -> dict[str, int]:
    """Value -> position of its last reader; graph outputs are read at len(nodes)."""
    last: dict[str, int] = {}
    for pos, node in enumerate(graph.node):
        for name in node.input:
            if name not in const:
                last[name] = pos
    for out in graph.output:
        last[out.name] = len(graph.node)
    return last


def _atoms(graph: onnx.GraphProto, const: set[str], used: dict[str, int]) -> list[list[int]]:
    """Node positions split at every cut (a single live value after the node)."""
    live = {i.name for i in graph.input if i.name not in const and used.get(i.name, -1) >= 0}
    atoms, current = [], []
    for pos, node in enumerate(graph.node):
        current.append(pos)
        live |= {o for o in node.output if o and o not in const and used.get(o, -1) > pos}
        live = {v for v in live if used.get(v, -1) > pos}
        if len(live) == 1:
            atoms.append(current)
            current = []
    if current:
        atoms.append(current)
    return atoms


def _compressed(node: onnx.NodeProto) -> bool:
    return node.domain == sbc.DOMAIN and node.op_type == sbc.OP_TYPE


def _elementwise(node: onnx.NodeProto, const: set[str]) -> bool:
    return (node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx")
            and sum(i not in const for i in node.input) == 1 and len(node.output) == 1)


def _layer_block(nodes: list[onnx.NodeProto], pos: int, atom: list[int], const: set[str]) -> Block:
    """One compressed conv and the elementwise nodes that alone read its output, inside `atom`."""
    span, out = [pos], nodes[pos].output[0]
    rest = [p for p in atom if p > pos]
    for p in rest:
        readers = [q for q in rest if out in nodes[q].input]
        if readers != [p] or not _elementwise(nodes[p], const):
            break
        span.append(p)
        out = nodes[p].output[0]
        rest = [q for q in rest if q > p]
    return _block(nodes, span, const, "layer")


def _block(nodes: list[onnx.NodeProto], span: list[int], const: set[str], kind: str) -> Block:
    produced = {o for p in span for o in nodes[p].output}
    inputs = tuple(dict.fromkeys(i for p in span for i in nodes[p].input if i not in const and i not in produced))
    layers = tuple(nodes[p].name or nodes[p].output[0] for p in span if _compressed(nodes[p]))
    return Block(tuple(span), inputs, nodes[span[-1]].output[0], layers, kind)
