"""The benchmark zoo (bench/zoo.py) builds valid models of the right architecture, cheaply at 32x32."""

import functools
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import zoo  # noqa: E402

from onnxstack.api import open_session  # noqa: E402

# Conv nodes, and parameters (millions) with BatchNorm folded into conv biases (torchvision's counts
# less the BatchNorm scales); VGG-16's at 224 with its 4096-wide classifier
ARCH = {"resnet18": (20, 11.68), "resnet50": (53, 25.53), "mobilenetv2": (52, 3.49)}


@functools.lru_cache(maxsize=None)
def small(name):
    return zoo.vgg16(32, hidden=64) if name == "vgg16" else zoo.build(name, 32)


@pytest.mark.parametrize("name", zoo.MODELS)
def test_builds_a_valid_model_that_runs(name):
    model = small(name)  # built once for all tests (read only)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (x,), (y,) = model.graph.input, model.graph.output
    assert x.name == "input" and y.name == "logits"
    assert [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == ["N", 3, 32, 32]
    out = open_session(model, threads=1).run(None, {"input": np.ones((2, 3, 32, 32), np.float32)})[0]
    assert out.shape == (2, 1000) and np.isfinite(out).all() and 0 < np.abs(out).mean() < 100


@pytest.mark.parametrize("name", sorted(ARCH))
def test_architecture(name):
    model = small(name)
    convs, params = ARCH[name]
    assert sum(n.op_type == "Conv" for n in model.graph.node) == convs
    assert round(sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6, 2) == params


def test_vgg16_classifier_and_convs():
    model = small("vgg16")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 13 and sum(n.op_type == "Gemm" for n in model.graph.node) == 3
    inits = {t.name: t.dims for t in model.graph.initializer}
    assert list(inits["fc_1.weight"]) == [64, 512]  # 512 x 1 x 1 after five pools of a 32x32 input


def test_resnet18_macs_at_imagenet_size():
    assert round(sum(zoo.conv_macs(zoo.build("resnet18")).values()) / 1e9, 2) == 1.81


def test_seeded_and_cached(tmp_path, monkeypatch):
    a, b, c = (zoo.build("mobilenetv2", 32, seed=s) for s in (1, 1, 2))
    assert a.SerializeToString() == b.SerializeToString() != c.SerializeToString()
    monkeypatch.setenv("ONNXSTACK_BENCH_CACHE", str(tmp_path))
    path = zoo.model_path("mobilenetv2", 32)
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert zoo.model_path("mobilenetv2", 32) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("alexnet")
