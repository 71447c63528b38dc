"""--rest int8: what compression leaves float, stored int8 per output channel through DequantizeLinear (rest.py),
counted in the report and the table; and the table's headline (file ratio first, the conv ratio and what
--target-ratio aims at)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxstack
from cli import main
from onnxstack.config import CompressConfig
from onnxstack.errors import ConfigError
from onnxstack.load import model_bytes
from onnxstack.report import format_table
from onnxstack.rest import MIN_ELEMENTS, store_rest
from onnxstack.runtime import predict_top1

from .models import conv_model, run_ort
from .test_int_layers import DequantizeLinear

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "sample_models/fashion_cnn.onnx"
RNG = np.random.default_rng(0)


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _init(name, *shape, scale=0.1):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _linear_model(opset=17):
    """x (2, 64) through a Gemm (transB=0, alpha 0.5: not lifted), a Gemm (transB=1), a MatMul, an Add of a
    constant table (Gather: no output-channel axis), a MatMul and a Gemm sharing one weight, a small and a 1-D
    tensor, and a weight holding a NaN."""
    inits = [_init("g0", 64, 48), _init("g1", 40, 48), _init("b1", 40), _init("m0", 40, 32),
             _init("table", 128, 8), _init("shared", 32, 32), _init("tiny", 32, 8), _init("nan", 8, 160)]
    inits[-1] = numpy_helper.from_array(np.where(np.arange(1280).reshape(8, 160) == 3, np.nan, 0.1)
                                        .astype(np.float32), "nan")
    nodes = [
        helper.make_node("Gemm", ["x", "g0"], ["y0"], name="gemm0", alpha=0.5),
        helper.make_node("Gemm", ["y0", "g1", "b1"], ["y1"], name="gemm1", transB=1),
        helper.make_node("MatMul", ["y1", "m0"], ["y2"], name="mm0"),
        helper.make_node("MatMul", ["y2", "shared"], ["y3"], name="mm1"),
        helper.make_node("Gemm", ["y3", "shared"], ["y4"], name="gemm2", transB=1),
        helper.make_node("MatMul", ["y4", "tiny"], ["y5"], name="mm2"),
        helper.make_node("Gather", ["table", "rows"], ["t"], name="gather"),
        helper.make_node("Add", ["y5", "t"], ["y6"], name="add"),
        helper.make_node("MatMul", ["y6", "nan"], ["out"], name="mm3"),
    ]
    inits.append(numpy_helper.from_array(np.array([0, 5], np.int64), "rows"))
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 160])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_store_rest_picks_the_output_channel_axis_and_says_why_it_leaves_the_others():
    model = _linear_model()
    out = _copy(model)
    record = store_rest(out, "int8")
    onnx.checker.check_model(out, full_check=True)
    touched = {e["name"]: e for e in record["touched"]}
    assert {k: (v["op"], v["axis"], v["channels"]) for k, v in touched.items()} == {
        "g0": ("Gemm", 1, 48), "g1": ("Gemm", 0, 40), "m0": ("MatMul", 1, 32)}
    for e in touched.values():
        n = int(np.prod(e["shape"]))
        assert e["bytes"] == 4 * n and e["bytes_after"] == n + 4 * e["channels"] and e["weight_rel_error"] < 0.02
    assert record["bytes_before"] == sum(e["bytes"] for e in touched.values())
    skipped = {e["name"]: e["reason"] for e in record["skipped"]}
    assert set(skipped) == {"table", "shared", "nan"}
    assert "read 2 times" in skipped["shared"] and "Gather 'gather' as input 0" in skipped["table"]
    assert "NaN" in skipped["nan"]
    assert record["small_left_float"] == {"tensors": 2, "bytes": 4 * (32 * 8 + 40)}  # tiny, b1
    inits = {t.name: t for t in out.graph.initializer}
    assert not {"g0", "g1", "m0"} & set(inits) and inits["g0.quantized"].data_type == TensorProto.INT8
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert {k: onnx.helper.get_attribute_value(n.attribute[0]) for k, n in dq.items()} == {"g0": 1, "g1": 0, "m0": 1}
    x = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    a, b = run_ort(model, x)[0], run_ort(out, x)[0]
    finite = np.isfinite(a)
    assert (finite == np.isfinite(b)).all() and not finite.all()  # the weight with a NaN is kept as it is
    assert np.linalg.norm(a[finite] - b[finite]) / np.linalg.norm(a[finite]) < 0.03


def test_store_rest_float_and_old_opsets_change_nothing():
    model = _linear_model()
    out = _copy(model)
    assert store_rest(out, "float") == {"mode": "float"} and out == model
    old = _linear_model(opset=12)
    out = _copy(old)
    record = store_rest(out, "int8")
    assert out == old and not record["touched"]
    assert all("opset >= 13" in e["reason"] for e in record["skipped"]) and len(record["skipped"]) == 6
    with pytest.raises(ValueError):
        store_rest(out, "int4")


def test_grouped_conv_transpose_and_graph_input_initializers_stay_float():
    w, t = _init("w", 16, 8, 3, 3), _init("t", 16, 8, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", group=2),
             helper.make_node("ConvTranspose", ["y", "t"], ["z"], name="ct2")]
    graph = helper.make_graph(nodes, "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 5, 5]),
                                            helper.make_tensor_value_info("t", TensorProto.FLOAT, [16, 8, 3, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    record = store_rest(model, "int8")
    reasons = {e["name"]: e["reason"] for e in record["skipped"]}
    assert "grouped ConvTranspose" in reasons["w"] and "graph input" in reasons["t"] and not record["touched"]


# --- the pipeline, the report and the table ----------------------------------------------------------


def _fashion_data():
    test = np.load(ROOT / "sample_models/data/fashion_test.npz")
    calib = np.load(ROOT / "sample_models/data/fashion_calib.npz")["input"][:300]
    return {"input": calib}, {"input": test["input"]}


@pytest.fixture(scope="module")
def fashion_runs():
    calib, test = _fashion_data()
    config = dict(skip=("conv4", "fc1"))
    runs = {rest: onnxstack.compress(FASHION, CompressConfig(rest=rest, **config), data=calib)
            for rest in ("float", "int8")}
    return runs, test


def test_rest_int8_shrinks_the_fashion_file_and_keeps_agreement(fashion_runs):
    """Layers skipped on the Fashion sample (conv4, fc1): with --rest int8 the file is much smaller and top-1
    agreement with the original on the test split stays within 1 point of --rest float (stock onnxruntime)."""
    runs, test = fashion_runs
    sizes = {k: model_bytes(r.model) for k, r in runs.items()}
    assert sizes["int8"] < 0.3 * sizes["float"]
    assert runs["int8"].report["file_ratio"] > 3 * runs["float"].report["file_ratio"]
    ref = predict_top1(onnx.load(FASHION), test)
    agree = {k: 100 * float((predict_top1(r.model, test) == ref).mean()) for k, r in runs.items()}
    assert abs(agree["int8"] - agree["float"]) <= 1.0, agree
    assert agree["int8"] > 80


def test_rest_int8_runs_in_the_reference_evaluator(fashion_runs):
    """onnx.reference has DequantizeLinear from opset 19 only: the opset-17 sample runs with the same semantics
    registered for 13-18 (tests/test_int_layers.py), and the outputs match onnxruntime's."""
    runs, test = fashion_runs
    x = test["input"][:8]
    ort_out = run_ort(runs["int8"].model, {"input": x})[0]
    from onnxstack import op
    got = ReferenceEvaluator(runs["int8"].model, new_ops=[DequantizeLinear, op.StackedBinaryConvRef]) \
        .run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ort_out, rtol=1e-3, atol=1e-3)


def test_rest_int8_runs_in_the_stock_reference_evaluator_from_opset_19():
    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 32}, {"out": 16}], opset=19)
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, skip=("conv1",), rest="int8"))
    assert [e["name"] for e in result.report["rest"]["touched"]] == ["conv1.weight"]
    x = RNG.standard_normal((2, 16, 12, 12)).astype(np.float32)
    got = ReferenceEvaluator(result.model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, run_ort(result.model, {"input": x})[0], rtol=1e-3, atol=1e-3)
    plain = onnxstack.compress(model, CompressConfig(slice_dim=8, skip=("conv1",)))
    want = run_ort(plain.model, {"input": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03


def test_rest_report_entry_and_table(fashion_runs):
    runs, _ = fashion_runs
    rest = runs["int8"].report["rest"]
    assert rest["mode"] == "int8" and rest["min_elements"] == MIN_ELEMENTS
    assert [(e["name"], e["consumer"], e["axis"], e["bytes"], e["bytes_after"]) for e in rest["touched"]] == [
        ("conv4.weight", "conv4", 0, 4 * 147456, 147456 + 4 * 128), ("fc1.weight", "fc1", 0, 4 * 147456, 147456 + 4 * 128)]
    assert rest["bytes_before"] == 8 * 147456 and rest["bytes_after"] == 2 * (147456 + 512)
    assert rest["skipped"] == [] and rest["small_left_float"]["tensors"] == 7  # conv1.weight (288) and the biases
    assert runs["float"].report["rest"] == {"mode": "float"}
    table = format_table(runs["int8"].report)
    assert "rest (--rest int8): 2 tensor(s) stored int8 per channel, 1179648 -> 295936 bytes" in table
    assert "  int8   conv4.weight 128x128x3x3 (Conv 'conv4', axis 0): 589824 -> 147968 bytes" in table
    assert "excluded by the user; weight stored int8 by --rest" in table
    assert "rest (" not in format_table(runs["float"].report)
    # the conv ratio does not count what --rest stored; the file ratio does
    assert runs["int8"].report["conv_ratio"] == runs["float"].report["conv_ratio"]


def test_rest_float_is_the_default_and_keeps_the_config_json():
    assert CompressConfig().rest == "float" and "rest" not in CompressConfig().to_dict()
    c = CompressConfig(rest="int8")
    assert c.to_dict()["rest"] == "int8" and CompressConfig.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(ConfigError, match="rest must be one of"):
        CompressConfig(rest="int4")


def _unlifted_head(opset=17):
    """Two convs, then a Gemm with alpha != 1 (not lifted to a Conv) reading a (K, N) weight "head"."""
    model = conv_model([{"in": 8, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 16}], opset=opset)
    g = model.graph
    g.node[-1].output[0] = "r1"
    g.initializer.append(_init("head", 16 * 10 * 10, 10))
    g.node.extend([helper.make_node("Flatten", ["r1"], ["f"], name="flat"),
                   helper.make_node("Gemm", ["f", "head"], ["output"], name="head", alpha=0.5)])
    del g.value_info[:]
    g.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10]))
    return model


def test_unlifted_gemm_weight_is_stored_int8_through_the_pipeline():
    """A Gemm with alpha != 1 is not lifted to a Conv: --rest int8 stores its (K, N) weight along axis 1."""
    model = _unlifted_head()
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, rest="int8"))
    touched = {e["name"]: e for e in result.report["rest"]["touched"]}
    assert set(touched) == {"head"} and touched["head"]["axis"] == 1 and touched["head"]["op"] == "Gemm"
    plain = onnxstack.compress(model, CompressConfig(slice_dim=8))
    x = {"input": RNG.standard_normal((2, 8, 12, 12)).astype(np.float32)}
    a, b = run_ort(plain.model, x)[0], run_ort(result.model, x)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03
    assert model_bytes(result.model) < model_bytes(plain.model) - 2.9 * 1600 * 10


# --- the headline ---------------------------------------------------------------------------------------


def test_file_ratio_is_the_headline_of_table_and_report():
    result = onnxstack.compress(conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 16}]),
                                CompressConfig(slice_dim=8))
    report = result.report
    assert next(iter(report)) == "file_ratio"
    assert "--target-ratio aims at" in report["ratios"]["conv_ratio"] and "headline" in report["ratios"]["file_ratio"]
    first = format_table(report).splitlines()[0]
    assert first.startswith(f"file ratio {report['file_ratio']:.1f}x ({report['original_bytes']} -> ")
    assert f"conv ratio {report['conv_ratio']:.1f}x" in first and "--target-ratio aims at" in first
    assert "target 20x" in format_table({**report, "target_ratio": 20.0}).splitlines()[0]


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_rest_int8_and_a_bad_value(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 32}, {"out": 16}]), path)
    runner = CliRunner()
    bad = runner.invoke(main, ["compress", str(path), "--rest", "int4"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--rest" in bad.stderr
    assert "Traceback" not in bad.output
    ok = runner.invoke(main, ["compress", str(path), "-d", "8", "--skip", "conv1", "--rest", "int8",
                              "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "o.onnx")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["name"] for e in report["rest"]["touched"]] == ["conv1.weight"]
    assert ok.stdout.startswith("file ratio ") and "rest (--rest int8): 1 tensor(s)" in ok.stdout
    assert report["compressed_bytes"] == (tmp_path / "o.onnx").stat().st_size
    help_text = " ".join(runner.invoke(main, ["compress", "--help"]).output.split())
    assert "float32 bits / stored bits of the weights and biases of all Conv layers" in help_text
    assert "--rest [float|int8]" in help_text


def test_lstm_input_and_recurrent_weights_are_stored_int8_a_scale_per_gate_row():
    """ddddocr's OCR keeps 15 MB of LSTM weights float beside its compressed convs: --rest int8 stores W and
    R along their gate-row axis (1), both directions under one scale a row; onnxruntime runs the result."""
    from onnxstack.rest import store_rest

    hidden, inputs = 16, 32
    inits = [_init("W", 2, 4 * hidden, inputs), _init("R", 2, 4 * hidden, hidden),
             numpy_helper.from_array(np.zeros((2, 8 * hidden), np.float32), "B")]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden,
                            direction="bidirectional")
    graph = helper.make_graph([node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "n", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2, "n", hidden])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    record = store_rest(stored, "int8")
    touched = {e["name"]: e for e in record["touched"]}
    assert set(touched) == {"W", "R"} and all(e["axis"] == 1 and e["op"] == "LSTM" for e in touched.values())
    onnx.checker.check_model(stored)
    x = {"x": RNG.standard_normal((5, 3, inputs)).astype(np.float32)}
    a, b = run_ort(model, x)[0], run_ort(stored, x)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03
    assert model_bytes(stored) < model_bytes(model) - 2.5 * (2 * 4 * hidden * (inputs + hidden))  # 4 -> 1 byte a value


def test_rest_int8_upgrades_an_opset_12_model_to_13_and_says_so():
    """ddddocr's OCR is opset 12, where DequantizeLinear has no axis: --rest int8 used to store nothing there."""
    model = _unlifted_head(opset=12)
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, rest="int8"))
    assert result.report["opset"]["upgraded"] == "12 -> 13" and "--rest int8" in result.report["opset"]["why"]
    assert {e["name"] for e in result.report["rest"]["touched"]} == {"head"}
    plain = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert "opset" not in plain.report  # rest float: the model keeps its opset
    x = {"input": RNG.standard_normal((2, 8, 12, 12)).astype(np.float32)}
    a, b = run_ort(plain.model, x)[0], run_ort(result.model, x)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03
