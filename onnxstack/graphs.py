"""Small helpers over ONNX graphs, each defined once: subgraph walks, fresh names, node lists."""

from __future__ import annotations

from typing import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every graph attribute of a node (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, attr.g
        for g in attr.graphs:
            yield attr.name, g


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of the graph or its subgraphs, and the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for _, sub in subgraphs(node):
            used |= used_names(sub)
    return used


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Value names read inside the subgraphs of the graph's nodes (recursively)."""
    reads: set[str] = set()
    for node in graph.node:
        for _, sub in subgraphs(node):
            for n in sub.node:
                reads.update(n.input)
            reads |= subgraph_reads(sub)
    return reads


def taken_names(graph: onnx.GraphProto) -> set[str]:
    """Names already used for initializers, graph inputs and node inputs/outputs of the main graph."""
    return ({t.name for t in graph.initializer} | {i.name for i in graph.input}
            | {v for n in graph.node for v in (*n.input, *n.output)})


class FreshNames:
    """Names not used yet: `fresh("w.codebook")` gives it, or "w.codebook_1", "_2", ... when taken."""

    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def __call__(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.taken:
            candidate, k = f"{name}_{k}", k + 1
        self.taken.add(candidate)
        return candidate


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Set the graph's node list (copies first: the nodes may be the graph's own)."""
    copies = []
    for node in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        copies.append(c)
    del graph.node[:]
    graph.node.extend(copies)
