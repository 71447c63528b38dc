"""Integer layers: per-layer int8 / int4 (DequantizeLinear) beside binary-stacked ones, from the config to the
file, the report, onnxruntime, onnx.reference and the torch bridge."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_19

import onnxstack
from onnxstack import op
from onnxstack.analyse import analyse
from onnxstack.config import CompressConfig, LayerOverride
from onnxstack.core import intq
from onnxstack.core.bits import pack_int4, unpack_int4
from onnxstack.core.calib import LayerStats
from onnxstack.errors import ConfigError
from onnxstack.fitters import int_candidate
from onnxstack.report import format_table

from .models import conv_model, run_ort

RNG = np.random.default_rng(0)
LAYERS = [dict(out=16, pads=[1, 1, 1, 1]), dict(out=32), dict(out=32, group=2), dict(out=16)]


class DequantizeLinear(DequantizeLinear_19):
    """onnx.reference implements DequantizeLinear from opset 19 only; opsets 13-18 have the same semantics."""

    op_domain = ""

    def _run(self, x, x_scale, x_zero_point=None, axis=1, **_):  # attributes of newer opsets, at their defaults
        return super()._run(x, x_scale, x_zero_point, axis)


def reference(model, x):
    opset = next(i.version for i in model.opset_import if i.domain == "")
    new_ops = [op.StackedBinaryConvRef] + ([DequantizeLinear] if opset < 19 else [])
    return ReferenceEvaluator(model, new_ops=new_ops).run(None, {"input": x})[0]


def mixed(first="int4", last="int4", grouped="int8"):
    return CompressConfig(overrides={"conv0": LayerOverride(representation=first),
                                     "conv2": LayerOverride(representation=grouped),
                                     "conv3": LayerOverride(representation=last)})


def feeds(n=64):
    return {"input": np.random.default_rng(1).standard_normal((n, 8, 12, 12)).astype(np.float32)}


def entries(result):
    return {e["name"]: e for e in result.report["layers"]}


def stored_ints(model):
    """weight name -> (int8 values, scales) of every integer layer, read back from the file."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            q, s = inits[node.input[0]], numpy_helper.to_array(inits[node.input[1]])
            if q.data_type == TensorProto.INT4:
                values = unpack_int4(q.raw_data, int(np.prod(q.dims))).reshape(q.dims)
            else:
                values = numpy_helper.to_array(q)
            out[node.output[0]] = (values, s)
    return out


def decoded_float_model(compressed):
    """The compressed model with every DequantizeLinear replaced by its numpy decode as a float initializer."""
    m = onnx.ModelProto()
    m.CopyFrom(compressed)
    ints = stored_ints(m)
    keep = [n for n in m.graph.node if n.op_type != "DequantizeLinear"]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    for name, (q, s) in ints.items():
        m.graph.initializer.append(numpy_helper.from_array(intq.decode(q, s), name))
    return m


# --- config ----------------------------------------------------------------------------------------


def test_config_per_layer_scale_is_validated_round_trips_and_is_stored_only_when_set():
    with pytest.raises(ConfigError, match="scale of 'c'"):
        CompressConfig(overrides={"c": LayerOverride(scale="channel")})
    cfg = CompressConfig(overrides={"a": LayerOverride(scale="filter"), "b": LayerOverride(slice_dim=8)})
    assert cfg.for_layer("a").scale == "filter" and cfg.for_layer("b").scale == cfg.for_layer("zz").scale == "slice"
    assert "scale" not in cfg.to_dict()["overrides"]["b"] and cfg.to_dict()["overrides"]["a"]["scale"] == "filter"
    assert CompressConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_config_representation_is_validated_and_stored_only_when_set():
    with pytest.raises(ConfigError, match="representation of 'c'"):
        CompressConfig(overrides={"c": LayerOverride(representation="int2")})
    cfg = CompressConfig(overrides={"a": LayerOverride(representation="int4"), "b": LayerOverride(slice_dim=8)})
    assert cfg.for_layer("a").representation == "int4" and cfg.for_layer("a").int_bits == 4
    assert cfg.for_layer("b").representation == "binary" and cfg.for_layer("zz").int_bits is None
    stored = json.loads(cfg.to_json())["overrides"]
    assert stored["a"]["representation"] == "int4" and "representation" not in stored["b"]
    assert CompressConfig.from_dict(json.loads(cfg.to_json())) == cfg


# --- the math --------------------------------------------------------------------------------------


def _correlated_stats(N=32, C=16, k=3, rows=3000, noise=0.0, seed=0):
    """Weight, bias and the stats of correlated inputs against the outputs; noise: upstream error added to the
    inputs the stats see (the outputs stay the original ones)."""
    RNG = np.random.default_rng(seed)
    K = C * k * k
    w = (RNG.standard_normal((N, C, k, k)) / np.sqrt(K)).astype(np.float32)
    x = (RNG.standard_normal((rows, K)) @ (np.eye(K) + 0.3 * RNG.standard_normal((K, K))) + 0.5).astype(np.float32)
    b = RNG.standard_normal(N).astype(np.float32)
    y = x @ w.reshape(N, -1).T + b
    stats = LayerStats.empty(K, N)
    stats.add(x + noise * RNG.standard_normal(x.shape).astype(np.float32), y)
    return w, b, stats


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_output_aware_fit_beats_round_to_nearest_on_correlated_inputs(bits, noise):
    w, b, stats = _correlated_stats(noise=noise)
    n = w.shape[0]
    q, s = intq.quantize_weights(w, bits)
    rtn = stats.relative_error(intq.decode(q, s).reshape(n, -1), b)
    q2, s2, b2 = intq.quantize_output_aware(w, stats, bits)
    gptq = stats.relative_error(intq.decode(q2, s2).reshape(n, -1), b2)
    if noise and bits == 8:  # the floor is the upstream error; the fit corrects part of it, beating the float weight
        assert gptq < min(rtn, stats.relative_error(w.reshape(n, -1), b)), (rtn, gptq)
    assert gptq - noise * 0.005 < 0.75 * rtn, (rtn, gptq)
    lo, hi = intq.qrange(bits)
    for values in (q, q2):
        assert values.dtype == np.int8 and values.shape == w.shape and lo <= values.min() and values.max() <= hi
    assert s2.dtype == np.float32 and s2.shape == (n,) and (s2 > 0).all() and b2.shape == (n,)


def test_round_to_nearest_clipping_search_and_zero_channels():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1] = 0
    w[2, 0, 0, 0] = 40.0  # an outlier: clipping it costs less than a coarse grid for the rest
    q, s = intq.quantize_weights(w, 4)
    assert (q[1] == 0).all() and np.isfinite(s).all()
    err = ((intq.decode(q, s) - w) ** 2).sum(axis=(1, 2, 3))
    plain = np.maximum(np.abs(w.reshape(4, -1)).max(1), 1e-30) / 7
    plain_err = ((np.clip(np.rint(w / plain[:, None, None, None]), -8, 7) * plain[:, None, None, None] - w) ** 2)
    assert (err[[0, 2, 3]] <= plain_err.sum(axis=(1, 2, 3))[[0, 2, 3]] + 1e-6).all()


def test_int4_packing_round_trips():
    values = RNG.integers(-8, 8, size=(5, 3, 3)).astype(np.int8)  # odd count
    raw = pack_int4(values)
    assert len(raw) == (values.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(raw, values.size).reshape(values.shape), values)
    t = onnx.TensorProto(name="q", data_type=TensorProto.INT4, dims=values.shape, raw_data=raw)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), values)  # onnx reads it the same way


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "data"])
def test_int8_and_int4_layers_end_to_end(calibrated):
    model = conv_model(LAYERS, opset=21, ir_version=10)
    data = feeds()
    result = onnxstack.compress(model, mixed(), data=data if calibrated else None)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    e = entries(result)
    assert [e[n]["representation"] for n in ("conv0", "conv1", "conv2", "conv3")] == ["int4", "binary", "int8", "int4"]
    fitted = "output" if calibrated else "weights"
    assert e["conv0"]["fitter"] == e["conv3"]["fitter"] == fitted and "fallback" not in e["conv0"]
    if calibrated:  # the grouped layer gets the weights-only fit, and says why
        assert e["conv2"]["fitter"] == "weights" and "grouped conv" in e["conv2"]["fallback"]
        assert e["conv0"]["output_snr_db"] > 15
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert types["conv0.weight.quantized"] == types["conv3.weight.quantized"] == TensorProto.INT4
    assert types["conv2.weight.quantized"] == TensorProto.INT8
    assert not {"conv0.weight", "conv2.weight", "conv3.weight"} & set(types)  # float weights dropped
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3 and all(helper.get_attribute_value(n.attribute[0]) == 0 for n in dq)
    convs = {n.name: n for n in out.graph.node if n.op_type == "Conv"}
    assert set(convs) == {"conv0", "conv2", "conv3"} and convs["conv0"].input[1] == dq[0].output[0]
    table = format_table(result.report)
    assert "repr" in table.splitlines()[1] and "int4" in table and "int8" in table

    x = data["input"][:4]
    got = run_ort(out, {"input": x})[0]
    np.testing.assert_allclose(got, run_ort(decoded_float_model(out), {"input": x})[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reference(out, x), got, rtol=1e-4, atol=1e-5)
    original = run_ort(model, {"input": x})[0]
    assert np.linalg.norm(got - original) < 0.8 * np.linalg.norm(original)


def test_report_bits_are_what_the_file_stores():
    model = conv_model(LAYERS, opset=21, ir_version=10)
    result = onnxstack.compress(model, mixed(), data=feeds())
    inits = {t.name: t for t in result.model.graph.initializer}

    def bits(t):
        if t.data_type == TensorProto.INT4:
            return 8 * len(t.raw_data)
        return 8 * numpy_helper.to_array(t).nbytes

    for name in ("conv0", "conv2", "conv3"):
        e = entries(result)[name]
        w = f"{name}.weight"
        parts = e["bits_by_part"]
        assert parts["weights"] == bits(inits[f"{w}.quantized"])
        assert parts["scales"] == bits(inits[f"{w}.scale"]) == 32 * e["shape"][0]
        bias = inits[f"{w}.bias"] if f"{w}.bias" in inits else inits[f"{name}.bias"]
        assert parts["bias"] == bits(bias)
        assert e["bits"] == parts["weights"] + parts["scales"] + parts["bias"]
    assert entries(result)["conv0"]["bits_by_part"]["weights"] == 4 * 16 * 8 * 9


def test_int4_below_opset_21_upgrades_the_model_when_the_outputs_stay():
    model = conv_model(LAYERS, opset=17)
    result = onnxstack.compress(model, mixed(), data=feeds())
    assert result.report["opset"]["upgraded"] == "17 -> 21"
    assert entries(result)["conv0"]["representation"] == "int4" and "fallback" not in entries(result)["conv0"]
    assert {i.version for i in result.model.opset_import if i.domain == ""} == {21}
    x = feeds(4)["input"]
    np.testing.assert_allclose(run_ort(result.model, {"input": x})[0], reference(result.model, x), rtol=1e-4,
                               atol=1e-5)
    assert model.opset_import[0].version == 17  # the input is not modified


def test_int4_below_opset_21_is_stored_as_int8_and_says_so(monkeypatch):
    from onnxstack import pipeline
    from onnxstack.errors import ModelError

    def refuse(model, target=12):
        raise ModelError("the converter cannot upgrade this model")

    monkeypatch.setattr(pipeline, "upgrade_checked", refuse)
    model = conv_model(LAYERS, opset=17)
    for data in (None, feeds()):
        result = onnxstack.compress(model, mixed(), data=data)
        assert "no int4 layers" in result.report["opset"]["why"] and result.report["opset"]["upgraded"] is None
        e = entries(result)
        reason = "int4 needs opset >= 21 (model has 17); stored as int8"
        assert e["conv0"]["representation"] == "int8" and e["conv0"]["fallback"] == reason
        assert reason in e["conv3"]["fallback"] and "fallback" not in e["conv1"]
        assert f"* conv0: {reason}" in format_table(result.report)
        types = {t.name: t.data_type for t in result.model.graph.initializer}
        assert types["conv0.weight.quantized"] == TensorProto.INT8
        x = feeds(4)["input"]
        got = run_ort(result.model, {"input": x})[0]
        np.testing.assert_allclose(reference(result.model, x), got, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, run_ort(decoded_float_model(result.model), {"input": x})[0], rtol=1e-4,
                                   atol=1e-5)


def test_int_layer_without_per_axis_dequantize_is_left_dense_with_its_reason():
    model = conv_model(LAYERS[:2], opset=12, ir_version=7)
    info = next(i for i in analyse(model, mixed()) if i.name == "conv0")
    assert "opset >= 13, model has 12" in info.reason


def test_int_layers_need_no_slice_depth():
    """The stem (3 input channels, fewer than d) is where int8 pays: it is compressed, not skipped."""
    model = conv_model([dict(out=16), dict(out=16)], in_ch=3, opset=21, ir_version=10)
    plain = entries(onnxstack.compress(model))
    assert "skipped" in plain["conv0"]
    result = onnxstack.compress(model, CompressConfig(overrides={"conv0": LayerOverride(representation="int8")}))
    assert entries(result)["conv0"]["representation"] == "int8"


def test_shared_int_weight_is_stored_and_dequantized_once():
    model = conv_model([dict(out=16, pads=[1, 1, 1, 1]), dict(out=16, pads=[1, 1, 1, 1])], in_ch=16,
                       opset=21, ir_version=10, share={1: 0})
    cfg = CompressConfig(overrides={n: LayerOverride(representation="int8") for n in ("conv0", "conv1")})
    out = onnxstack.compress(model, cfg).model
    assert [n.op_type for n in out.graph.node].count("DequantizeLinear") == 1
    x = np.random.default_rng(2).standard_normal((2, 16, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"input": x})[0], run_ort(decoded_float_model(out), {"input": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_int_candidate_matches_the_fitted_plan():
    """The search's candidate function gives the bits and damage of the plan the fit stage builds (on the first
    layer, whose current inputs are the original ones)."""
    from onnxstack.calibrate import Walk

    model = conv_model(LAYERS, opset=21, ir_version=10)
    data = feeds()
    result = onnxstack.compress(model, mixed(), data=data)
    infos = [i for i in analyse(model, mixed()) if i.eligible]
    with Walk(model, infos[:1], data, mixed(), sequential=False) as walk:
        (info, stats), = list(walk)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for bits, opset, stored in ((4, 21, 4), (8, 21, 8), (4, 17, 8)):
        got_bits, damage = int_candidate(info, weights[info.weight_name], weights[info.bias_name],
                                         stats, bits, opset)
        assert got_bits == 16 * 8 * 9 * stored + 32 * 16 * 2
        if bits == 4 and opset == 21:
            e = entries(result)["conv0"]
            # rel 1e-4: the fit stage sums its held-out rows apart, then merges them (float64 order)
            assert got_bits == e["bits"] and damage == pytest.approx(e["output_rel_error"], rel=1e-4)


# --- fine-tuning -----------------------------------------------------------------------------------


def classifier(opset=21):
    """conv_model's chain, then GlobalAveragePool and Flatten: logits (n, 10)."""
    m = conv_model([dict(out=16, pads=[1, 1, 1, 1]), dict(out=16, pads=[1, 1, 1, 1]), dict(out=10)], opset=opset,
                   ir_version=10)
    g = m.graph
    g.node[-1].output[0] = "r2"
    g.node.extend([helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
                   helper.make_node("Flatten", ["gap"], ["output"])])
    del g.output[:], g.value_info[:]
    g.output.append(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_torch_bridge_runs_and_finetunes_a_mixed_model():
    torch = pytest.importorskip("torch")
    from onnxstack.torch_bridge import FinetuneConfig, build_module, finetune

    torch.set_num_threads(1)
    teacher = classifier()
    cfg = CompressConfig(slice_dim=8, overrides={"conv0": LayerOverride(representation="int4"),
                                                 "conv2": LayerOverride(representation="int8")})
    data = feeds(96)
    compressed = onnxstack.compress(teacher, cfg, data=data).model
    x = data["input"]
    module = build_module(compressed)
    out = module(torch.from_numpy(x[:8]))[0]
    np.testing.assert_allclose(out.detach().numpy(), run_ort(compressed, {"input": x[:8]})[0], rtol=1e-4, atol=1e-5)
    out.square().mean().backward()  # the integer layers' scales and biases train; their integers are buffers
    for key in ("conv0_weight_scale", "conv0_weight_bias", "conv2_weight_scale"):
        assert module.params[key].grad is not None and module.params[key].grad.abs().sum() > 0
    assert not any("quantized" in k for k in module.param_names)
    labels = run_ort(teacher, {"input": x})[0].argmax(1)
    result = finetune(compressed, teacher, (x, labels), config=FinetuneConfig(epochs=1, batch_size=32, seed=0))
    assert [r["epoch"] for r in result.history] == [0, 1]
    onnx.checker.check_model(result.model, full_check=True)
    before, after = stored_ints(compressed), stored_ints(result.model)
    for name, (q, _) in before.items():  # integers frozen
        np.testing.assert_array_equal(after[name][0], q)
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types["conv0.weight.quantized"] == TensorProto.INT4
    np.testing.assert_allclose(run_ort(result.model, {"input": x[:8]})[0],
                               run_ort(decoded_float_model(result.model), {"input": x[:8]})[0], rtol=1e-4, atol=1e-5)


def test_a_target_ratio_stores_depthwise_convs_as_int8_and_spends_the_bits_elsewhere():
    # a depthwise conv cannot be sliced (one input channel a group); left float it takes the budget's bits.
    # The search stores it int8 (weights only, with its reason), counted in the budget; a user's override wins
    layers = [dict(out=32, pads=[1, 1, 1, 1]), dict(out=32, group=32, pads=[1, 1, 1, 1]), dict(out=32)]
    model = conv_model(layers, opset=17)
    data = feeds(48)
    result = onnxstack.compress(model, CompressConfig(), data=data, target_ratio=8)
    e = entries(result)
    assert e["conv1"]["representation"] == "int8" and "grouped conv" in e["conv1"]["fallback"]
    assert result.report["allocation"]["conv1"]["representation"] == "int8"
    assert abs(result.report["conv_ratio"] / 8 - 1) < 0.15
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types["conv1.weight.quantized"] == TensorProto.INT8
    x = data["input"][:4]
    got, original = run_ort(result.model, {"input": x})[0], run_ort(model, {"input": x})[0]
    assert np.linalg.norm(got - original) < 0.5 * np.linalg.norm(original)
    kept = onnxstack.compress(model, CompressConfig(overrides={"conv1": LayerOverride(skip=True)}), data=data,
                              target_ratio=8)
    assert entries(kept)["conv1"].get("skipped") and "conv1" not in kept.report["allocation"]
