import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxstack
from onnxstack import CompressConfig, ConfigError, NothingToCompressError, OutputError, op

from .models import conv_model, run_ort

X = np.random.default_rng(0).standard_normal((2, 16, 12, 12)).astype(np.float32)


def reference(model, x):
    return ReferenceEvaluator(model, new_ops=[op.StackedBinaryConvRef]).run(None, {"input": x})[0]


def assert_matches_reference(model, x=X):
    ref = reference(model, x)
    got = run_ort(model, {"input": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


@pytest.fixture
def model():
    return conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 24, "strides": [2, 2]},
                       {"out": 40, "k": 1, "bias": False}, {"out": 8, "k": 3, "auto_pad": "SAME_UPPER"}])


@pytest.mark.parametrize("execution", ["auto", "dense", "stacked"])
def test_compress_rewrites_every_eligible_conv(model, execution):
    before = model.SerializeToString()
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, execution=execution))
    assert model.SerializeToString() == before  # the input is untouched
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    ops = [(n.op_type, n.domain, n.name, list(n.output)) for n in out.graph.node]
    assert [o[2] for o in ops] == [n.name for n in model.graph.node]
    assert [o[3] for o in ops] == [list(n.output) for n in model.graph.node]
    assert all(o[:2] == (op.OP_TYPE, op.DOMAIN) for o in ops if o[2].startswith("conv"))
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    if execution != "auto":
        assert {op.form_of(n.overload) for n in out.graph.node if n.domain == op.DOMAIN} == {execution}
    assert not any(t.name.endswith(".weight") for t in out.graph.initializer)
    meta = {p.key: p.value for p in out.metadata_props}
    assert CompressConfig.from_dict(json.loads(meta["onnxstack.config"])).slice_dim == 8
    assert json.loads(meta["onnxstack.report"])["conv_ratio"] == pytest.approx(result.report["conv_ratio"])
    assert_matches_reference(out)


def test_report_counts_every_stored_bit(model):
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, scale="filter"))
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for layer in result.report["layers"]:
        w = layer["weight"]
        stored = sum(inits[f"{w}.{r}"].nbytes for r in ("codebook", "indices", "scales")) * 8
        bias = 32 * layer["shape"][0] if layer["bits_by_part"]["bias"] else 0
        assert layer["bits"] == stored + bias
        assert layer["original_bits"] == 32 * (np.prod(layer["shape"]) + (layer["shape"][0] if bias else 0))
    r = result.report
    assert r["conv_ratio"] == pytest.approx(r["conv_bits_original"] / r["conv_bits_compressed"])
    assert r["compressed_bytes"] == result.model.ByteSize() and r["original_bytes"] == model.ByteSize()


def test_shared_weight_is_stored_once():
    model = conv_model([{"in": 16, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 16, "pads": [1, 1, 1, 1]}], share={1: 0})
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    names = [t.name for t in result.model.graph.initializer]
    assert names.count("conv0.weight.codebook") == 1 and "conv1.weight.codebook" not in names
    nodes = [n for n in result.model.graph.node if n.domain == op.DOMAIN]
    assert nodes[0].input[1:4] == nodes[1].input[1:4]
    assert result.report["conv_bits_original"] == 32 * (16 * 16 * 9 + 2 * 16)  # one weight, two biases
    assert_matches_reference(result.model)


def test_weight_also_read_elsewhere_is_kept():
    model = conv_model([{"in": 16, "out": 16}])
    model.graph.node.append(helper.make_node("Identity", ["conv0.weight"], ["w_out"], name="peek"))
    model.graph.output.append(helper.make_tensor_value_info("w_out", onnx.TensorProto.FLOAT, [16, 16, 3, 3]))
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert "conv0.weight" in {t.name for t in result.model.graph.initializer}
    onnx.checker.check_model(result.model, full_check=True)


def test_opset_11_model_is_upgraded():
    model = conv_model([{"in": 16, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 8}], opset=11, ir_version=6)
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert {i.domain: i.version for i in result.model.opset_import}[""] == op.MIN_OPSET
    assert_matches_reference(result.model)


def test_same_seed_same_bytes(model):
    a = onnxstack.compress(model, CompressConfig(slice_dim=8, seed=3)).model.SerializeToString()
    b = onnxstack.compress(model, CompressConfig(slice_dim=8, seed=3)).model.SerializeToString()
    assert a == b


def test_codebook_larger_than_slices_is_refused(model):
    with pytest.raises(ConfigError, match="exceeds the .* slices of layer 'conv"):
        onnxstack.compress(model, CompressConfig(slice_dim=8, codebook_size=4096))


def test_nothing_to_compress(model):
    with pytest.raises(NothingToCompressError, match="no eligible Conv"):
        onnxstack.compress(model, CompressConfig(slice_dim=64))


@pytest.mark.parametrize("bad", [dict(slice_dim=0), dict(codebook_size=1), dict(scale="x"), dict(execution="y"),
                                 dict(iterations=-1)])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        CompressConfig(**bad)


def test_config_roundtrip():
    cfg = CompressConfig(slice_dim=4, skip=("a",), overrides={"b": onnxstack.LayerOverride(codebook_size=8)})
    assert CompressConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown config keys: bogus"):
        CompressConfig.from_dict({"bogus": 1})


def test_save_is_safe(model, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = onnxstack.compress(src, CompressConfig(slice_dim=8))
    with pytest.raises(OutputError, match="output is the input"):
        result.save(src, overwrite=True)
    out = result.save(tmp_path / "o.onnx")
    with pytest.raises(OutputError, match="exists"):
        result.save(out)
    result.save(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]
    assert onnx.load(src).SerializeToString() == model.SerializeToString()
    sess = onnxstack.open_session(out, threads=1)
    assert sess.run(None, {"input": X})[0].shape[0] == 2


def test_model_bytes_is_exact_without_serialising():
    """model_bytes works on the skeleton (large raw tensors as stubs) and must equal protobuf's own count."""
    from onnxstack.load import model_bytes
    big = conv_model([dict(out=96), dict(out=128)], in_ch=64)  # 64x96x9 and 96x128x9 floats: >= 64 KiB
    assert model_bytes(big) == big.ByteSize()
    big.graph.initializer[0].data_location = onnx.TensorProto.DEFAULT  # an explicit default is serialised too
    assert model_bytes(big) == big.ByteSize()


def test_wrong_raw_size_of_a_large_tensor_is_refused(tmp_path):
    """The checker runs on the skeleton, so the raw size check of the large tensors is onnxstack's own."""
    model = conv_model([dict(out=128), dict(out=128)], in_ch=64)
    w = model.graph.initializer[0]
    w.raw_data = w.raw_data[:-4]
    with pytest.raises(onnxstack.ModelError, match="holds .* bytes of raw data"):
        onnxstack.compress(model)
    model.graph.initializer[0].raw_data = w.raw_data + b"\0" * 8  # too many bytes is as wrong
    with pytest.raises(onnxstack.ModelError, match="holds .* bytes of raw data"):
        onnxstack.compress(model)


def test_cost_model_counts_the_stacked_form_fixed_cost():
    """Small layers stay dense once the output size is known; large ones with a small codebook go stacked."""
    from onnxstack.core import cost
    # 256x256x3x3, d=16 (s=16), m=16: 9.8x fewer MACs a pixel in the stacked form
    args = (256, 256, 3, 3, 16, 16, 16, 1)
    assert cost.choose_form(*args) == "stacked"
    assert cost.choose_form(*args, pixels=28 * 28) == "stacked"
    assert cost.choose_form(*args, pixels=1) == "dense"  # the fixed cost dominates a 1x1 map
    assert cost.choose_form(256, 256, 3, 3, 16, 16, 16, 2) == "dense"  # grouped: dense only


def test_analyse_knows_output_sizes():
    model = conv_model([dict(out=8, strides=[2, 2], pads=[1, 1, 1, 1]), dict(out=8)], hw=(12, 12))
    infos = onnxstack.inspect(model)
    assert [i.pixels for i in infos] == [36, 16]  # 12x12 -> 6x6 (stride 2) -> 4x4 (3x3, no padding)
