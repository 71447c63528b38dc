"""Real architectures from both torch exporters at opsets 11, 13, 17 and 21 (see real_models.py).

For each: compress succeeds (or a broken export is refused with one clear error), the output passes
the full ONNX checker, runs in plain onnxruntime at another batch size and spatial size than the
export's, and matches the numpy reference of the same compressed weights: the compressed model with
each StackedBinaryConv replaced by a standard Conv whose weight is op.decode_weight of its stored
tensors. A subset is also run through onnx.reference with StackedBinaryConvRef.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxstack
from onnxstack import CompressConfig, ModelError, NothingToCompressError, op

from .models import run_ort

real_models = pytest.importorskip("tests.real_models", reason="needs torch")

NO_DYNAMO = None if importlib.util.find_spec("onnxscript") else "the dynamo exporter needs onnxscript"

ARCHS, OPSETS = real_models.ARCHS, real_models.OPSETS
EXPORTERS = [pytest.param("legacy", id="legacy"),
             pytest.param("dynamo", id="dynamo", marks=pytest.mark.skipif(NO_DYNAMO is not None, reason=str(NO_DYNAMO)))]
CASES = [pytest.param(a, e, o, id=f"{a}-{e}-{o}", marks=pytest.mark.skipif(e == "dynamo" and NO_DYNAMO is not None,
                                                                         reason=str(NO_DYNAMO)))
         for a in ARCHS for e in real_models.EXPORTERS for o in OPSETS]
# exports that are broken before onnxstack sees them: compress must refuse them with one clear error
BROKEN = {("yolo", "dynamo", 17): "num_outputs"}  # onnx's converter leaves Split-18's num_outputs in Split-13


def config(opset: int) -> CompressConfig:
    """Small slices so that narrow layers qualify; both execution forms across the opsets."""
    return CompressConfig(slice_dim=4, iterations=4, max_codebook_size=16,
                          execution="stacked" if opset in (13, 21) else "auto")


def decoded_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """The compressed model with every StackedBinaryConv node (main graph) as a plain Conv whose weight
    is op.decode_weight (numpy) of the node's stored tensors."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    for k, node in enumerate(ref.graph.node):
        if node.domain != op.DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        channels = attrs.pop("channels")
        weight = op.decode_weight(*(inits[n] for n in node.input[1:4]), channels)
        name = f"decoded_weight_{k}"
        ref.graph.initializer.append(numpy_helper.from_array(weight, name))
        inputs = [node.input[0], name] + ([node.input[4]] if len(node.input) > 4 else [])
        node.CopyFrom(helper.make_node("Conv", inputs, list(node.output), name=node.name, **attrs))
    del ref.functions[:]
    kept = [i for i in ref.opset_import if i.domain != op.DOMAIN]
    del ref.opset_import[:]
    ref.opset_import.extend(kept)
    return ref


def assert_close(got, ref, tol=1e-4):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and np.isfinite(g).all()
        assert np.linalg.norm(g - r) <= tol * max(np.linalg.norm(r), 1e-12), np.abs(g - r).max()


def default_opset(model):
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("arch,exporter,opset", CASES)
def test_real_graph(arch, exporter, opset):
    model = real_models.export(arch, exporter, opset)
    if (arch, exporter, opset) in BROKEN:
        with pytest.raises(ModelError, match=BROKEN[arch, exporter, opset]):
            onnxstack.compress(model, config(opset))
        return
    result = onnxstack.compress(model, config(opset))
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) == max(default_opset(model), op.MIN_OPSET)
    assert out.ir_version == max(model.ir_version, 10)
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == real_models.output_names(arch)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert all(dims[a].dim_param for a in ARCHS[arch].dynamic)  # dynamic axes stay dynamic
    _check_layers(arch, result.report)
    x = real_models.example_input(arch, batch=3, scale=2, seed=1)  # not the export's batch or size
    got = run_ort(out, {"input": x})
    assert_close(got, run_ort(decoded_reference(out), {"input": x}))
    assert [g.shape for g in got] == [t.shape for t in real_models.run_torch(arch, x)]


def _check_layers(arch, report):
    skipped = {layer["name"]: layer["skipped"] for layer in report["layers"] if "skipped" in layer}
    # every stem sees 1 or 3 input channels (< d=4); everything else qualifies except depthwise convs
    assert all(re.fullmatch(r"[13] input channels, fewer than slice depth d=4", r) or r.startswith("depthwise")
               for r in skipped.values()), skipped
    depthwise = sum(r.startswith("depthwise") for r in skipped.values())
    assert depthwise == (17 if arch == "mobilenet_v2" else 0)
    assert report["layers_compressed"] >= {"audio1d": 4, "unet": 14, "vgg16_bn": 12, "densenet": 11}.get(arch, 19)
    ratios = [layer.get("ratio", 1.0) for layer in report["layers"]]
    assert all(r > 1 for layer, r in zip(report["layers"], ratios) if "skipped" not in layer)
    # the total is a bits-weighted mean of the layers' ratios (skipped layers at 1), above 1
    assert 1 < report["conv_ratio"] and min(ratios) <= report["conv_ratio"] <= max(ratios)
    assert report["conv_ratio"] == pytest.approx(report["conv_bits_original"] / report["conv_bits_compressed"])


@pytest.mark.parametrize("arch", ["resnet18", "unet", "audio1d", "yolo"])
def test_onnx_reference_evaluator(arch):
    """onnx.reference with the numpy StackedBinaryConv runs the whole compressed graph."""
    out = onnxstack.compress(real_models.export(arch, "legacy", 17), config(13)).model
    x = real_models.example_input(arch, batch=2, seed=2)
    ref = ReferenceEvaluator(out, new_ops=[op.StackedBinaryConvRef]).run(None, {"input": x})
    assert_close(run_ort(out, {"input": x}), ref)


def test_1d_convs_become_2d():
    result = onnxstack.compress(real_models.export("audio1d", "legacy", 13), config(13))
    ops = [n.op_type for n in result.model.graph.node]
    # 4 convs and the fully connected head (lifted to a 1x1 Conv by one more Unsqueeze / Squeeze pair)
    assert ops.count("StackedBinaryConv") == 5 and ops.count("Unsqueeze") == ops.count("Squeeze") == 6
    assert {tuple(layer["shape"][2:]) for layer in result.report["layers"]} == {(1, 3), (1, 5), (1, 31), (1, 1)}


def initializers_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer held by a Constant node instead (as some exporters write)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    return out


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_weights_in_constant_nodes(exporter):
    model = real_models.export("resnet18", exporter, 17)
    as_init = onnxstack.compress(model, config(17))
    as_const = onnxstack.compress(initializers_as_constants(model), config(17))
    assert as_const.report["layers_compressed"] == as_init.report["layers_compressed"] == 20  # 19 convs + fc
    x = real_models.example_input("resnet18", batch=2)
    assert_close(run_ort(as_const.model, {"input": x}), run_ort(decoded_reference(as_const.model), {"input": x}))
    assert_close(run_ort(as_const.model, {"input": x}), run_ort(as_init.model, {"input": x}), 1e-5)


class _Reader:
    """onnxruntime.quantization calibration data: a few seeded batches."""

    def __init__(self, arch):
        self.batches = iter([{"input": real_models.example_input(arch, seed=s)} for s in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _quantize(tmp_path, arch, nodes=None, op_types=("Conv",)):
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(real_models.export(arch, "legacy", 17), src)
    quantize_static(str(src), str(dst), _Reader(arch), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                    nodes_to_quantize=nodes, per_channel=True)
    return dst


def test_weights_through_dequantize_linear_are_skipped(tmp_path):
    model = real_models.export("resnet18", "legacy", 17)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    path = _quantize(tmp_path, "resnet18", nodes=convs[:6])
    result = onnxstack.compress(path, config(17))
    skipped = {layer["name"]: layer.get("skipped") for layer in result.report["layers"]}
    assert all("comes from DequantizeLinear" in skipped[name] for name in convs[1:6])
    assert result.report["layers_compressed"] == len(convs) - 6 + 1  # + the fully connected head
    onnx.checker.check_model(result.model, full_check=True)
    x = real_models.example_input("resnet18", batch=2)
    assert_close(run_ort(result.model, {"input": x}), run_ort(decoded_reference(result.model), {"input": x}))


def test_fully_quantized_model_is_refused_with_the_reason(tmp_path):
    with pytest.raises(NothingToCompressError, match="DequantizeLinear"):
        onnxstack.compress(_quantize(tmp_path, "vgg16_bn", op_types=("Conv", "Gemm", "MatMul")), config(17))


def control_flow_model() -> onnx.ModelProto:
    """conv0 -> If(then: Conv w1 | else: Conv w2) -> Loop(2 x Conv w3 + Relu), plus conv4 in the main graph."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), f"w{i}")
         for i in range(5)}
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    branch = lambda wn: helper.make_graph(  # noqa: E731
        [helper.make_node("Conv", ["h0", wn], [f"{wn}_out"], name=f"conv_{wn}", pads=[1, 1, 1, 1])],
        f"branch_{wn}", [], [vi(f"{wn}_out")])
    body = helper.make_graph(
        [helper.make_node("Conv", ["r_in", "w3"], ["c3"], name="conv_w3", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c3"], ["r_out"], name="relu_loop"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("r_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("r_out")])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["flag"], ["h1"], name="branch", then_branch=branch("w1"), else_branch=branch("w2")),
        helper.make_node("Loop", ["trips", "go", "h1"], ["h2"], name="repeat", body=body),
        helper.make_node("Conv", ["h2", "w4"], ["y"], name="conv4", pads=[1, 1, 1, 1]),
    ]
    trips = numpy_helper.from_array(np.array(2, np.int64), "trips")
    go = numpy_helper.from_array(np.array(True), "go")
    graph = helper.make_graph(nodes, "control_flow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 10, 10]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 10, 10])],
                              initializer=[*w.values(), trips, go])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_convs_inside_if_and_loop_are_skipped_with_reason():
    result = onnxstack.compress(control_flow_model(), CompressConfig(slice_dim=4, max_codebook_size=16))
    skipped = {layer["name"]: layer.get("skipped") for layer in result.report["layers"]}
    assert skipped["conv0"] is None and skipped["conv4"] is None
    assert "inside the 'then_branch' subgraph of If node 'branch'" in skipped["branch/then_branch/conv_w1"]
    assert "inside the 'else_branch' subgraph of If node 'branch'" in skipped["branch/else_branch/conv_w2"]
    assert "inside the 'body' subgraph of Loop node 'repeat'" in skipped["repeat/body/conv_w3"]
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert {"w1", "w2", "w3"} <= {t.name for t in out.graph.initializer}  # still read by the subgraphs
    x = np.random.default_rng(1).standard_normal((2, 8, 10, 10)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        got = run_ort(out, feeds)
        assert_close(got, run_ort(decoded_reference(out), feeds))
        assert_close(got, ReferenceEvaluator(out, new_ops=[op.StackedBinaryConvRef]).run(None, feeds))


@pytest.mark.parametrize("arch,exporter,opset", [("resnet18", "legacy", 11), ("yolo", "legacy", 17)] + [
    pytest.param(*case, marks=pytest.mark.skipif(NO_DYNAMO is not None, reason=str(NO_DYNAMO)))
    for case in (("mobilenet_v2", "dynamo", 21), ("audio1d", "dynamo", 13))])
def test_inlined_functions_give_the_same_outputs(tmp_path, arch, exporter, opset):
    result = onnxstack.compress(real_models.export(arch, exporter, opset), config(opset))
    path = result.save(tmp_path / "inlined.onnx", inline_functions=True)
    inlined = onnx.load(path)
    onnx.checker.check_model(inlined, full_check=True)
    assert not inlined.functions
    assert all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
    assert op.DOMAIN not in {i.domain for i in inlined.opset_import}
    x = real_models.example_input(arch, batch=2, scale=2)
    assert_close(run_ort(inlined, {"input": x}), run_ort(result.model, {"input": x}), 1e-6)


# onnxruntime release -> (highest IR version, highest default-domain opset) it reads (ORT's versioning docs)
ORT_READS = {(1, 17): (9, 20), (1, 18): (10, 21), (1, 19): (10, 21), (1, 20): (10, 21)}


def pinned_onnxruntime() -> tuple[int, int]:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    match = re.search(r'"onnxruntime>=(\d+)\.(\d+)', text)
    assert match, "pyproject.toml must pin a minimum onnxruntime"
    return int(match.group(1)), int(match.group(2))


def test_output_loads_in_the_pinned_onnxruntime():
    """Every compressed output of the suite is read by the oldest onnxruntime the project allows."""
    pinned = pinned_onnxruntime()
    if pinned not in ORT_READS:
        pytest.skip(f"no IR/opset entry for onnxruntime {pinned}")
    max_ir, max_opset = ORT_READS[pinned]
    for arch in ("resnet18", "audio1d"):
        for opset in OPSETS:
            out = onnxstack.compress(real_models.export(arch, "legacy", opset), config(opset)).model
            assert out.ir_version <= max_ir, (
                f"IR {out.ir_version} needs onnxruntime >= 1.18 (function overloads); pyproject pins "
                f"onnxruntime>={pinned[0]}.{pinned[1]}, which reads IR <= {max_ir}")
            assert default_opset(out) <= max_opset


def test_dense_blocks_calibrate():
    """Issue 13's dense-block stack, test-sized: every conv reads a Concat of the block so far, so the walk
    carries many live tensors across each cut. Calibrated, it must run and move the output less than the
    data-free fit of the same settings (bench/dense_blocks.py times the 150-conv one)."""
    model = real_models.export("densenet", "legacy", 17)
    cfg = CompressConfig(slice_dim=4, iterations=4, max_codebook_size=16)
    calib = {"input": real_models.example_input("densenet", batch=48, seed=2)}
    test = {"input": real_models.example_input("densenet", batch=16, seed=3)}
    ref = run_ort(model, test)[0]
    plain = onnxstack.compress(model, cfg).model
    calibrated = onnxstack.compress(model, cfg, data=calib, reconstruct=False)
    assert calibrated.report["layers_compressed"] >= 11
    got = run_ort(calibrated.model, test)
    assert_close(got, run_ort(decoded_reference(calibrated.model), test))
    err = lambda out: float(np.linalg.norm(out - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(got[0]) < err(run_ort(plain, test)[0]), (err(got[0]), err(run_ort(plain, test)[0]))
