"""The op's implementations agree: numpy reference (OpRun), onnxruntime running the function in both
forms, and a plain Conv with the decoded weight."""

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxstack import op
from onnxstack.core.bits import index_dtype, pack_codebook
from onnxstack.core.conv import conv2d

from .models import run_ort


def op_model(N, C, k, d, m, *, form, opset=17, bias=True, per_filter=False, terms=None, hw=(9, 11), seed=0,
             **attrs):
    """One StackedBinaryConv with random stored tensors; returns (model, stored tensors)."""
    rng = np.random.default_rng(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    group = attrs.get("group", 1)
    cg = C // group
    s = -(-cg // d)
    book = np.where(rng.standard_normal((m, d * kh * kw)) > 0, 1, -1)
    extra = (terms,) if terms else ()  # terms=None: rank-2 (one codeword a slice)
    t = {
        "codebook": pack_codebook(book, (d, kh, kw)),
        "indices": rng.integers(0, m, (N, s, *extra)).astype(index_dtype(m)),
        "scales": rng.standard_normal((N, 1 if per_filter else s, *extra)).astype(np.float16),
    }
    if bias:
        t["bias"] = rng.standard_normal(N).astype(np.float32)
    conv_attrs = {"kernel_shape": [kh, kw], "group": group, **attrs}
    node = op.make_node(["x", *t], "y", "sbc", form, cg, conv_attrs, slice_dim=d)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N, "h", "w"])],
        initializer=[numpy_helper.from_array(v, k_) for k_, v in t.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op.DOMAIN, 1)],
                              functions=[op.make_function(node.overload, opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model, t, conv_attrs, cg


CASES = [
    dict(N=8, C=16, k=3, d=16, m=4),
    dict(N=8, C=10, k=3, d=4, m=5, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
    dict(N=6, C=7, k=1, d=3, m=2),
    dict(N=5, C=12, k=(3, 1), d=5, m=9, auto_pad="SAME_UPPER"),
    dict(N=4, C=9, k=5, d=9, m=3, auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(N=8, C=8, k=2, d=2, m=16, auto_pad="VALID", bias=False),
    dict(N=12, C=6, k=3, d=1, m=11, per_filter=True, pads=[1, 1, 1, 1]),
    dict(N=8, C=10, k=3, d=4, m=6, terms=2, pads=[1, 1, 1, 1]),
    dict(N=6, C=16, k=1, d=8, m=300, terms=3, per_filter=True),
    dict(N=5, C=9, k=3, d=3, m=4, terms=1, strides=[2, 2]),
]


@pytest.mark.parametrize("form", op.FORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forms_agree(form, case):
    model, t, attrs, cg = op_model(form=form, **case)
    x = np.random.default_rng(1).standard_normal((2, case["C"], 9, 11)).astype(np.float32)
    ref = ReferenceEvaluator(model, new_ops=[op.StackedBinaryConvRef]).run(None, {"x": x})[0]
    got = run_ort(model, {"x": x})[0]
    w = op.decode_weight(t["codebook"], t["indices"], t["scales"], cg)
    plain = conv2d(x.astype(np.float64), w.astype(np.float64), t.get("bias"), **{k: v for k, v in attrs.items() if k != "kernel_shape"})
    scale = np.abs(plain).max()
    assert got.shape == ref.shape == plain.shape
    assert np.abs(ref - plain).max() / scale < 1e-5
    assert np.abs(got - ref).max() / scale < 1e-5


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_dense(group):
    model, t, attrs, cg = op_model(8, 16, 3, 2, 6, form="dense", group=group, pads=[1, 1, 1, 1])
    x = np.random.default_rng(2).standard_normal((1, 16, 9, 11)).astype(np.float32)
    ref = ReferenceEvaluator(model, new_ops=[op.StackedBinaryConvRef]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [12, 13, 17, 21])
@pytest.mark.parametrize("form", op.FORMS)
def test_opsets(opset, form):
    model, *_ = op_model(6, 10, 3, 4, 5, form=form, opset=opset)
    x = np.random.default_rng(3).standard_normal((1, 10, 9, 11)).astype(np.float32)
    ref = ReferenceEvaluator(model, new_ops=[op.StackedBinaryConvRef]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_function_needs_opset_12():
    with pytest.raises(ValueError, match="opset >= 12"):
        op.make_function("dense", 11)


def test_runs_in_a_process_without_onnxstack(tmp_path):
    model, *_ = op_model(6, 10, 3, 4, 5, form="stacked")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{"x": np.ones((1, 10, 9, 11), np.float32)}})[0]
        assert "onnxstack" not in sys.modules
        print(y.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1, 6, 7, 9)"


def test_reference_rejects_bad_shapes():
    model, t, attrs, cg = op_model(6, 10, 3, 4, 5, form="dense")
    x = np.zeros((1, 11, 9, 11), np.float32)
    with pytest.raises(ValueError, match="X.shape"):
        op.stacked_binary_conv(x, t["codebook"], t["indices"], t["scales"], channels=cg, **attrs)


def _input_size_free(case):
    """Every case but SAME padding at a stride > 1 (its pads depend on the input size; see op.node_attributes)."""
    return not (case.get("auto_pad", "").startswith("SAME") and any(s > 1 for s in case.get("strides", [1])))


@pytest.mark.parametrize("form", op.FORMS)
@pytest.mark.parametrize("case", [c for c in CASES if _input_size_free(c)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_plain_reference_evaluator_runs_the_function(form, case):
    """onnx's own ReferenceEvaluator, without new_ops, runs the model-local function as onnxruntime does."""
    model, *_ = op_model(form=form, **case)
    x = np.random.default_rng(4).standard_normal((2, case["C"], 9, 11)).astype(np.float32)
    got = run_ort(model, {"x": x})[0]
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert ref.shape == got.shape
    assert np.abs(ref - got).max() / np.abs(got).max() < 1e-5


@pytest.mark.parametrize("execution", op.FORMS)
def test_compressed_model_runs_in_the_plain_reference_evaluator(execution):
    import onnxstack

    from .models import conv_model

    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 16, "strides": [2, 2]},
                        {"out": 16, "k": 1, "bias": False}, {"out": 8, "auto_pad": "SAME_UPPER"},
                        {"out": 16, "auto_pad": "VALID", "dilations": [2, 2]}])
    out = onnxstack.compress(model, onnxstack.CompressConfig(slice_dim=8, execution=execution)).model
    assert sum(n.op_type == op.OP_TYPE for n in out.graph.node) == 5
    x = np.random.default_rng(5).standard_normal((2, 16, 12, 12)).astype(np.float32)
    got = run_ort(out, {"input": x})[0]
    ref = ReferenceEvaluator(out).run(None, {"input": x})[0]
    np.testing.assert_allclose(ref, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())
