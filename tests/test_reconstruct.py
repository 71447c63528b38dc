"""Block reconstruction: blocks found from the graph, the block loss drops, the written model keeps its
structure and runs in onnxruntime, runs are deterministic, bad options fail with one clear line."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxstack  # noqa: E402
from onnxstack.errors import ConfigError, DataError  # noqa: E402
from onnxstack.torch_bridge.blocks import find_blocks  # noqa: E402
from onnxstack.torch_bridge.reconstruct import METADATA_KEY, ReconstructConfig, reconstruct  # noqa: E402

from .models import run_ort  # noqa: E402

torch.set_num_threads(1)
FAST = dict(steps=60, batch_size=16, threads=1)


def tiny(residual: bool, seed: int = 0, c: int = 4, hw: int = 6, classes: int = 5) -> onnx.ModelProto:
    """conv0-Relu, then conv1-Relu-conv2 (+ r0 -> Add when residual) -Relu, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:])))
                                             .astype(np.float32), name))
        return name

    pads = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", w("c0.w", 8, c, 3, 3)], ["h0"], name="conv0", **pads),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", w("c1.w", 8, 8, 3, 3)], ["h1"], name="conv1", **pads),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", w("c2.w", 8, 8, 3, 3)], ["h2"], name="conv2", **pads),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["h2", "r0"], ["s"], name="add"))
    nodes += [helper.make_node("Relu", ["s" if residual else "h2"], ["r2"], name="relu2"),
              helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", w("fc.w", classes, 8 * hw * hw)], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, hw, hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module", params=[False, True], ids=["chain", "residual"])
def case(request):
    original = tiny(request.param)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((96, 4, 6, 6)).astype(np.float32)
    model, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**FAST))
    return original, compressed, x, model, report


def test_blocks_chain_and_residual():
    chain = onnxstack.compress(tiny(False), onnxstack.CompressConfig(slice_dim=4, codebook_size=4, skip=("fc",))).model
    blocks = find_blocks(chain)
    assert [(b.layers, b.inputs, b.output) for b in blocks] == [
        (("conv0",), ("x",), "r0"), (("conv1",), ("r0",), "r1"), (("conv2",), ("r1",), "r2")]
    assert [b.layers for b in find_blocks(chain, group=2)] == [("conv0", "conv1"), ("conv2",)]
    res = onnxstack.compress(tiny(True), onnxstack.CompressConfig(slice_dim=4, codebook_size=4, skip=("fc",))).model
    blocks = find_blocks(res)
    assert [(b.layers, b.inputs, b.output, b.kind) for b in blocks] == [
        (("conv0",), ("x",), "r0", "block"), (("conv1", "conv2"), ("r0",), "r2", "block")]
    # a cut-free region with more layers than allowed: one layer a block, each with its own activation
    assert [(b.layers, b.output, b.kind) for b in find_blocks(res, max_layers=1)][1:] == [
        (("conv1",), "r1", "layer"), (("conv2",), "h2", "layer")]


def test_runs_in_onnxruntime_and_passes_checker(case):
    original, _, x, model, report = case
    onnx.checker.check_model(model, full_check=True)
    (y,) = run_ort(model, {"x": x[:7]})
    assert y.shape == (7, 5) and np.isfinite(y).all()
    assert METADATA_KEY in {p.key for p in model.metadata_props}
    assert report["totals"]["blocks"] == len(report["blocks"]) > 0


def test_block_loss_drops(case):
    _, _, _, _, report = case
    blocks = report["blocks"]
    assert all(b["steps"] == FAST["steps"] for b in blocks)
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks)  # a block that got worse is put back
    assert all(b["kept"] == (b["loss_trained"] < b["loss_before"]) for b in blocks)
    assert sum(b["loss_after"] for b in blocks) < 0.9 * sum(b["loss_before"] for b in blocks)
    assert blocks[-1]["kept"] and blocks[-1]["loss_after"] < 0.9 * blocks[-1]["loss_before"]


def test_output_error_drops(case):
    original, compressed, x, model, _ = case
    (ref,) = run_ort(original, {"x": x})
    err = [float(np.mean((run_ort(m, {"x": x})[0] - ref) ** 2)) for m in (compressed, model)]
    assert err[1] < err[0]


def test_structure_unchanged(case):
    _, compressed, _, model, _ = case

    def structure(m):
        nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output), n.SerializeToString()
                  if n.op_type != "Constant" else b"") for n in m.graph.node]
        inits = [(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer]
        return nodes, inits, [f.name for f in m.functions], list(m.graph.input), list(m.graph.output)

    assert structure(model) == structure(compressed)
    changed = [t.name for t, u in zip(model.graph.initializer, compressed.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()]
    assert changed and all(".weight" in n or n.startswith("c") for n in changed)


def test_deterministic_for_a_seed(case):
    original, compressed, x, model, _ = case
    again, _ = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**FAST))
    assert [t.SerializeToString() for t in again.graph.initializer] == \
           [t.SerializeToString() for t in model.graph.initializer]


def test_qdrop_reassign_channel_loss_and_image_cap():
    original = tiny(True)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((64, 4, 6, 6)).astype(np.float32)
    config = ReconstructConfig(**FAST, qdrop=0.5, reassign_every=20, loss="channel", max_images=40)
    model, report = reconstruct(original, compressed, {"x": x, "labels": np.zeros(64)}, config)
    onnx.checker.check_model(model, full_check=True)
    assert report["totals"]["images"] == 40 and all(b["images"] == 40 for b in report["blocks"])
    assert all(b["loss_after"] <= b["loss_before"] for b in report["blocks"])


def test_time_limit_stops_early():
    original = tiny(False)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((32, 4, 6, 6)).astype(np.float32)
    _, report = reconstruct(original, compressed, x, ReconstructConfig(steps=10**6, threads=1, max_minutes=0.02))
    assert report["totals"]["seconds"] < 20 and all(b["steps"] < 10**6 for b in report["blocks"])


@pytest.mark.parametrize("bad", [
    dict(steps=0), dict(steps=1.5), dict(batch_size=-1), dict(lr=0), dict(latent_lr=float("nan")),
    dict(qdrop=1.5), dict(loss="l1"), dict(reassign_every=-1), dict(max_minutes=0), dict(device="tpu"),
    dict(train_latent=False, train_scales=False, train_bias=False), dict(group=0), dict(train_bias="yes"),
])
def test_bad_config_raises_one_line(bad):
    with pytest.raises(ConfigError) as e:
        ReconstructConfig(**bad)
    assert "\n" not in str(e.value) and str(e.value)
    with pytest.raises(ConfigError):
        ReconstructConfig.from_dict({"stepz": 3})


def test_bad_data_raises():
    original = tiny(False)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    with pytest.raises(DataError, match="no data for model input"):
        reconstruct(original, compressed, {"input": np.zeros((4, 4, 6, 6), np.float32)}, ReconstructConfig(**FAST))
