"""Learned values back into the ONNX file, by initializer name; the graph itself is never re-exported.

The result is the compressed model with the same nodes, names, dtypes and shapes: packed sign(latent)
codebooks, (re-assigned) indices, float16 scales, float32 biases and dense parameters.
"""

from __future__ import annotations

import json

import numpy as np

import onnx

from ..errors import ModelError, OnnxstackError
from .graph import OnnxModule

METADATA_KEY = "onnxstack.finetune"


def write_back(compressed_model: onnx.ModelProto, module: OnnxModule, metadata: dict | None = None) -> onnx.ModelProto:
    """A copy of `compressed_model` whose initializers hold the module's values; `metadata` (JSON-ready) is
    stored under onnxstack.finetune. The result passes onnx.checker's full check."""
    out = onnx.ModelProto()
    out.CopyFrom(compressed_model)
    arrays = module.stored_tensors()
    found = set()
    for init in out.graph.initializer:
        if init.name not in arrays:
            continue
        arr = arrays[init.name]
        if tuple(init.dims) != arr.shape:
            raise ModelError(f"initializer '{init.name}' has shape {tuple(init.dims)}, the module's is {arr.shape}")
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        found.add(init.name)
    missing = sorted(set(arrays) - found)
    if missing:
        raise ModelError(f"the model has no initializers named {missing[:5]}; was the module built from it?")
    if metadata:
        set_metadata(out, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as e:  # noqa: BLE001 - a failure here is our bug
        raise OnnxstackError(f"internal error: the fine-tuned model fails the ONNX checker: {e}") from None
    return out


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def original_weights(student_model: onnx.ModelProto, teacher_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Codebook initializer name -> the original Conv weight (matched by node output name)."""
    inits = {t.name: t for t in teacher_model.graph.initializer}
    convs = {n.output[0]: n for n in teacher_model.graph.node if n.op_type == "Conv"}
    out = {}
    for node in student_model.graph.node:
        conv = convs.get(node.output[0]) if node.op_type == "StackedBinaryConv" else None
        if conv is not None and len(conv.input) > 1 and conv.input[1] in inits:
            out[node.input[1]] = onnx.numpy_helper.to_array(inits[conv.input[1]])
    return out
