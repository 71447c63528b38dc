import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstack import CompressConfig, LayerOverride
from onnxstack.analyse import analyse

from .models import conv_model


def reasons(model, **cfg):
    return {i.name: i.reason for i in analyse(model, CompressConfig(**cfg))}


def test_eligible_and_small_channels():
    model = conv_model([{"in": 8, "out": 16}, {"out": 32}])
    r = reasons(model, slice_dim=16)
    assert r["conv0"] == "8 input channels, fewer than slice depth d=16"
    assert r["conv1"] is None


def test_depthwise_and_grouped():
    model = conv_model([{"in": 32, "out": 32, "group": 32}, {"out": 32, "group": 4}, {"out": 32, "group": 2}])
    r = reasons(model, slice_dim=16)
    assert r["conv0"].startswith("depthwise conv with 1 input channel")
    assert r["conv1"].startswith("grouped conv with 8 input channel")
    assert r["conv2"] is None


def test_excluded_by_user_by_skip_and_override():
    model = conv_model([{"in": 16, "out": 16}, {"out": 16}])
    r = reasons(model, slice_dim=8, skip=("conv0",), overrides={"conv1": LayerOverride(skip=True)})
    assert r == {"conv0": "excluded by the user", "conv1": "excluded by the user"}


def test_override_slice_dim_changes_eligibility():
    model = conv_model([{"in": 8, "out": 16}])
    assert reasons(model, slice_dim=16, overrides={"conv0": LayerOverride(slice_dim=4)})["conv0"] is None


def test_non_constant_weight_and_1d_conv():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn"),
             helper.make_node("Conv", ["z", "w1"], ["y1"], name="oned")]
    w1 = numpy_helper.from_array(np.ones((8, 16, 3), np.float32), "w1")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 5, 5]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 16, 3, 3]),
                                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)], initializer=[w1])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = reasons(model, slice_dim=4)
    assert r["dyn"] == "weight 'w' is not a constant initializer"
    assert r["oned"].startswith("1-D convolution")


def test_initializer_overridable_as_input_is_not_constant():
    model = conv_model([{"in": 16, "out": 16}])
    model.graph.input.append(helper.make_tensor_value_info("conv0.weight", TensorProto.FLOAT, [16, 16, 3, 3]))
    assert "not a constant initializer" in reasons(model, slice_dim=8)["conv0"]


def test_nan_weight():
    model = conv_model([{"in": 16, "out": 16}])
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "conv0.weight"))
    assert reasons(model, slice_dim=8)["conv0"] == "weight holds NaN or Inf"
