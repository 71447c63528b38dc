"""Tiny models built in code, shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_model(layers, *, in_ch=None, hw=(12, 12), opset=17, ir_version=8, seed=0, share=None):
    """A chain of Conv(+Relu) layers. Each layer: dict(out, k=3, group=1, bias=True, **conv attrs).

    share: {layer index: earlier layer index} makes a layer reuse an earlier layer's weight tensor.
    """
    rng = np.random.default_rng(seed)
    c = in_ch or layers[0].get("in", 8)
    nodes, inits, prev = [], [], "input"
    share = share or {}
    for i, spec in enumerate(layers):
        spec = dict(spec)
        out, k, group, bias = spec.pop("out"), spec.pop("k", 3), spec.pop("group", 1), spec.pop("bias", True)
        spec.pop("in", None)
        kh, kw = (k, k) if isinstance(k, int) else k
        wname = f"conv{share[i]}.weight" if i in share else f"conv{i}.weight"
        if i not in share:
            w = (rng.standard_normal((out, c // group, kh, kw)) / np.sqrt(c * kh * kw / group)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, wname))
        ins = [prev, wname]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32) * 0.1, f"conv{i}.bias"))
            ins.append(f"conv{i}.bias")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", group=group, **spec))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, c = f"r{i}", out
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_ch or layers[0].get("in", 8), *hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
