"""report.py: the conv totals count every stored bit, as the file holds it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxstack
from onnxstack import CompressConfig
from onnxstack.config import LayerOverride

from .models import conv_model


def _bits(t):
    return 8 * numpy_helper.to_array(t).nbytes


def conv_tensors(model, conv_types=("Conv", "StackedBinaryConv")):
    """Names of the stored tensors (initializers, Constant outputs) that Conv-like nodes read, directly or
    through the nodes that compute their weights."""
    stored = {t.name: t for t in model.graph.initializer}
    stored.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    producer = {o: n for n in model.graph.node for o in n.output}
    found, todo = set(), [v for n in model.graph.node if n.op_type in conv_types for v in n.input[1:]]
    while todo:
        v = todo.pop()
        if v in stored:
            found.add(v)
        elif v in producer:
            todo.extend(producer[v].input)
    return found, stored


def file_conv_bits(original, compressed):
    """(conv bits of the input, conv bits of the output): every stored tensor of a Conv counted once; in the
    output also each former conv tensor the file still holds (kept for another reader)."""
    before, stored_in = conv_tensors(original, ("Conv",))
    after, stored_out = conv_tensors(compressed)
    after |= before & set(stored_out)
    return sum(_bits(stored_in[n]) for n in before), sum(_bits(stored_out[n]) for n in after)


def with_extra(model, nodes, outputs=(), inits=()):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, []) for o in outputs)
    return model


def quantized_weight_model():
    """conv1's weight is DequantizeLinear(int8 tensor): not a constant, skipped, still stored."""
    model = conv_model([{"in": 16, "out": 32}, {"out": 16}])
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv1.weight"))
    scale = np.float32(np.abs(w).max() / 127)
    q = numpy_helper.from_array(np.round(w / scale).astype(np.int8), "conv1.weight_q")
    inits = [t for t in model.graph.initializer if t.name != "conv1.weight"]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*inits, q, numpy_helper.from_array(np.array(scale, np.float32), "conv1.scale")])
    deq = helper.make_node("DequantizeLinear", ["conv1.weight_q", "conv1.scale"], ["conv1.weight"], name="deq")
    model.graph.node.insert(0, deq)
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def read_elsewhere_model():
    """conv0's weight is also an input of a ReduceSum whose result is a graph output."""
    model = conv_model([{"in": 16, "out": 32}, {"out": 16}])
    return with_extra(model, [helper.make_node("ReduceSum", ["conv0.weight"], ["wsum"], name="wsum", keepdims=0)],
                      ["wsum"])


CASES = {
    "weight not a constant": (quantized_weight_model, CompressConfig(slice_dim=8)),
    "weight read elsewhere": (read_elsewhere_model, CompressConfig(slice_dim=8)),
    "shared weight, two settings": (
        lambda: conv_model([{"in": 16, "out": 16}, {"out": 16}], share={1: 0}),
        CompressConfig(slice_dim=8, overrides={"conv1": LayerOverride(codebook_size=4)})),
    "shared weight, one setting": (
        lambda: conv_model([{"in": 16, "out": 16}, {"out": 16}], share={1: 0}), CompressConfig(slice_dim=8)),
    "shared weight, one skipped": (
        lambda: conv_model([{"in": 16, "out": 16}, {"out": 16}], share={1: 0}),
        CompressConfig(slice_dim=8, skip=("conv1",))),
}


@pytest.mark.parametrize("case", CASES)
def test_conv_totals_are_what_the_file_stores(case):
    make, config = CASES[case]
    model = make()
    result = onnxstack.compress(model, config)
    report = result.report
    before, after = file_conv_bits(model, result.model)
    assert (report["conv_bits_original"], report["conv_bits_compressed"]) == (before, after)
    assert report["compressed_bytes"] == result.model.ByteSize()
    assert report["conv_ratio"] == pytest.approx(before / after)


def test_table_lists_the_allocation_check_and_marks_the_kept_one():
    from onnxstack.report import check_lines

    check = {"samples": 64, "measure": "argmax disagreement, then output relative squared error",
             "tried": [{"allocation": "least summed damage", "conv_ratio": 8.3, "output_rel_mse": 0.02,
                        "argmax_disagreement": 0.04, "kept": False},
                       {"allocation": "Gemm_97 as int4", "conv_ratio": 8.0, "output_rel_mse": 0.003,
                        "argmax_disagreement": 0.007, "kept": True}]}
    lines = check_lines(check)
    assert "2 allocations built and run on 64 calibration samples" in lines[0]
    assert lines[2].strip().startswith("kept Gemm_97 as int4: 8.00x") and "kept" not in lines[1]
    assert "held-out" not in lines[0]
    assert "run on 64 held-out calibration samples" in check_lines({**check, "held_out": True})[0]
    assert check_lines(None) == []
