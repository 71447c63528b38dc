"""The compressed model for runtimes without ONNX-function support.

onnx.inliner expands every StackedBinaryConv node into the body of its function overload (standard
ops only: BitShift, Cast, Gather, MatMul, Reshape, Slice, Conv, ...), so the model needs neither
model-local functions nor the com.onnxstack domain. Other local functions of the model are kept.
The inlined graph computes exactly what the function computes (tests compare the outputs).
"""

from __future__ import annotations

import onnx
import onnx.inliner

from . import op
from .errors import OutputError
from .load import exceeds_limit


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with the com.onnxstack functions inlined; `model` is not changed."""
    ours = sorted({(f.domain, f.name) for f in model.functions if f.domain == op.DOMAIN})
    if not ours:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    if exceeds_limit(model):
        raise OutputError("inlining the functions of a model over 2 GB is not supported; save it without inlining")
    out = onnx.inliner.inline_selected_functions(model, ours, exclude=False)
    if not _uses_domain(out.graph, op.DOMAIN) and not any(
            n.domain == op.DOMAIN for f in out.functions for n in f.node):
        kept = [i for i in out.opset_import if i.domain != op.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out


def _uses_domain(graph: onnx.GraphProto, domain: str) -> bool:
    for node in graph.node:
        if node.domain == domain:
            return True
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                if _uses_domain(sub, domain):
                    return True
    return False
