"""The torch bridge agrees with onnxruntime on the operators CNNs use, and its StackedBinaryConv2d
layer agrees with the numpy specification of the op."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxstack import op  # noqa: E402
from onnxstack.core.bits import index_dtype, pack_codebook  # noqa: E402
from onnxstack.torch_bridge import OnnxModule, StackedBinaryConv2d, UnsupportedOpError, build_module  # noqa: E402

from .models import conv_model, run_ort  # noqa: E402

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def rand(name, *shape, scale=1.0):
    return const(name, RNG.standard_normal(shape) * scale)


def graph_model(nodes, inputs, outputs, inits, opset):
    graph = helper.make_graph(
        nodes, "ops", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


N = helper.make_node


def model_cnn():
    """Conv / BN / pools / activations / arithmetic / Pad / Resize / ConvTranspose / Slice / Gemm / MatMul."""
    nodes = [
        N("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 1], pads=[1, 0, 2, 1]),
        N("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
        N("Relu", ["bn"], ["r"]),
        N("MaxPool", ["r"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        N("Conv", ["mp", "w2"], ["c2"], group=2, dilations=[2, 2], pads=[2, 1, 2, 3]),
        N("LeakyRelu", ["c2"], ["lr"], alpha=0.1),
        N("Clip", ["lr", "lo", "hi"], ["cl"]),
        N("AveragePool", ["cl"], ["ap"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        N("HardSwish", ["ap"], ["hs"]),
        N("Split", ["hs", "split"], ["sa", "sb"], axis=1),
        N("HardSigmoid", ["sa"], ["hsa"], alpha=0.3, beta=0.4),
        N("Sigmoid", ["sb"], ["sgb"]),
        N("Concat", ["hsa", "sgb"], ["cat"], axis=1),
        N("Mul", ["cat", "k1"], ["mu"]), N("Add", ["mu", "k2"], ["ad"]), N("Sub", ["ad", "k3"], ["su"]),
        N("Div", ["su", "k4"], ["dv"]),
        N("Pad", ["dv", "pads"], ["pd"], mode="reflect"),
        N("Resize", ["pd", "", "scales"], ["rs"], mode="nearest"),
        N("ConvTranspose", ["rs", "wt", "bt"], ["ct"], strides=[2, 2], pads=[1, 1, 0, 0], output_padding=[1, 1]),
        N("Slice", ["ct", "starts", "ends", "axes", "steps"], ["sl"]),
        N("Transpose", ["sl"], ["tr"], perm=[0, 2, 3, 1]), N("Transpose", ["tr"], ["tr2"], perm=[0, 3, 1, 2]),
        N("GlobalAveragePool", ["tr2"], ["gap"]),
        N("Flatten", ["gap"], ["fl"]),
        N("Gemm", ["fl", "wg", "bg"], ["gm"], transB=1, alpha=0.5, beta=2.0),
        N("MatMul", ["gm", "wm"], ["mm"]),
        N("Reshape", ["mm", "shape"], ["logits"]),
        N("Softmax", ["logits"], ["prob"], axis=1),
    ]
    inits = [
        rand("w1", 8, 3, 3, 3, scale=0.3), rand("b1", 8), rand("bn_s", 8), rand("bn_b", 8), rand("bn_m", 8),
        const("bn_v", RNG.uniform(0.5, 2, 8)), rand("w2", 8, 4, 3, 3, scale=0.3),
        const("lo", -0.5), const("hi", 2.0), const("split", [3, 5], np.int64), rand("k1", 1, 8, 1, 1),
        rand("k2", 8, 1, 1), const("k3", 0.25), const("k4", RNG.uniform(1, 2, (1, 1, 1, 5))),
        const("pads", [0, 0, 1, 2, 0, 0, 2, 1], np.int64), const("scales", [1, 1, 2, 2]),
        rand("wt", 8, 4, 3, 3, scale=0.3), rand("bt", 4), const("starts", [1, 0], np.int64),
        const("ends", [-1, 100], np.int64), const("axes", [2, 3], np.int64), const("steps", [1, 2], np.int64),
        rand("wg", 6, 4), rand("bg", 6), rand("wm", 6, 5), const("shape", [0, 5], np.int64),
    ]
    return graph_model(nodes, [("x", ["n", 3, 10, 10])], ["prob", "logits", "ct", "mp"], inits, 17)


def model_resize_pool():
    """Resize modes, pool padding / ceil variants, Split / Pad / Clip / Slice forms of opset 18, shape ops."""
    nodes = [
        N("Resize", ["x", "", "", "sizes"], ["r1"], mode="linear", axes=[2, 3]),
        N("Resize", ["x", "", "sc15"], ["r2"], mode="linear", coordinate_transformation_mode="align_corners"),
        N("Resize", ["x", "", "sc2"], ["r3"], mode="nearest", coordinate_transformation_mode="asymmetric",
          nearest_mode="floor"),
        N("Resize", ["x", "", "", "sizes"], ["r4"], mode="nearest", coordinate_transformation_mode="pytorch_half_pixel", axes=[2, 3],
          nearest_mode="round_prefer_ceil"),
        N("Resize", ["x", "", "sc15"], ["r5"], mode="linear", coordinate_transformation_mode="asymmetric"),
        N("AveragePool", ["x"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
          count_include_pad=1),
        N("MaxPool", ["x"], ["p2"], kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
        N("AveragePool", ["x"], ["p3"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        N("MaxPool", ["x"], ["p4"], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 1], ceil_mode=1),
        N("Split", ["x"], ["s1", "s2"], axis=2, num_outputs=2),
        N("Pad", ["x", "pads4", "", "pad_axes"], ["pd1"], mode="edge"),
        N("Pad", ["x", "pads8", "pad_value"], ["pd2"]),
        N("Clip", ["x", "lo"], ["cl"]),
        N("Slice", ["x", "neg_start", "neg_end", "axis3", "neg_step"], ["sl"]),
        N("Shape", ["x"], ["sh"]), N("Gather", ["sh", "zero"], ["b"], axis=0),
        N("Unsqueeze", ["b", "axis0"], ["bu"]), N("Concat", ["bu", "minus1"], ["cc"], axis=0),
        N("Reshape", ["x", "cc"], ["flat"]),
        N("ReduceMean", ["x", "axes23"], ["rm"], keepdims=0),
        N("Unsqueeze", ["rm", "axis1"], ["rmu"]), N("Squeeze", ["rmu", "axis1"], ["sq"]),
        N("Conv", ["x", "w"], ["cs"], auto_pad="SAME_LOWER", strides=[2, 2]),
        N("GlobalMaxPool", ["x"], ["gmp"]),
    ]
    inits = [
        const("sizes", [9, 11], np.int64), const("sc15", [1, 1, 1.5, 2.0]), const("sc2", [1, 1, 2, 2]),
        const("pads4", [1, 2, 0, 1], np.int64), const("pad_axes", [2, 3], np.int64),
        const("pads8", [0, 1, 1, 0, 0, 0, 2, 3], np.int64), const("pad_value", 0.5), const("lo", 0.1),
        const("neg_start", [-1], np.int64), const("neg_end", [-100], np.int64), const("axis3", [3], np.int64),
        const("neg_step", [-2], np.int64), const("zero", 0, np.int64), const("axis0", [0], np.int64),
        const("minus1", [-1], np.int64), const("axes23", [2, 3], np.int64), const("axis1", [1], np.int64),
        rand("w", 5, 4, 3, 3),
    ]
    outs = ["r1", "r2", "r3", "r4", "r5", "p1", "p2", "p3", "p4", "s1", "s2", "pd1", "pd2", "cl", "sl", "flat", "sq",
            "cs", "gmp"]
    return graph_model(nodes, [("x", ["n", 4, 6, 7])], outs, inits, 18)


def model_legacy():
    """Opset 11 forms: Split / Squeeze / Unsqueeze / ReduceMean attributes, Softmax over flattened axes."""
    nodes = [
        N("Softmax", ["x"], ["sm"], axis=1),
        N("Split", ["x"], ["a", "b"], axis=1, split=[1, 2]),
        N("Clip", ["x", "lo", "hi"], ["cl"]),
        N("Unsqueeze", ["x"], ["us"], axes=[0]), N("Squeeze", ["us"], ["sq"], axes=[0]),
        N("ReduceMean", ["x"], ["rm"], axes=[1], keepdims=1),
        N("Pad", ["x", "pads", "value"], ["pd"]),
        N("Resize", ["x", "roi", "scales"], ["rs"], mode="nearest", coordinate_transformation_mode="asymmetric"),
        N("ConvTranspose", ["x", "wt"], ["ct"], strides=[2, 2], group=1, dilations=[1, 2]),
        N("ConvTranspose", ["x", "wt"], ["ct2"], strides=[2, 2], output_shape=[9, 10]),
        N("AveragePool", ["x"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 0, 0, 1]),
        N("Tanh", ["x"], ["th"]), N("Max", ["x", "th"], ["mx"]), N("Min", ["x", "th"], ["mn"]),
        N("PRelu", ["x", "slope"], ["pr"]),
    ]
    inits = [const("lo", -0.3), const("hi", 0.4), const("pads", [0, 0, 1, 0, 0, 1, 0, 2], np.int64),
             const("value", 1.5), const("roi", np.zeros(0)), const("scales", [1, 1, 2, 3]),
             rand("wt", 3, 2, 3, 3), rand("slope", 3, 1, 1)]
    return graph_model(nodes, [("x", ["n", 3, 4, 5])], ["sm", "a", "b", "cl", "sq", "rm", "pd", "rs", "ct", "ct2", "ap", "mx", "mn", "pr"],
                       inits, 11)


@pytest.mark.parametrize("make", [model_cnn, model_resize_pool, model_legacy])
@pytest.mark.parametrize("batch", [1, 3])
def test_bridge_matches_onnxruntime(make, batch):
    model = make()
    x = RNG.standard_normal((batch, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]))
    x = x.astype(np.float32)
    expected = run_ort(model, {"x": x})
    got = build_module(model)(torch.from_numpy(x))
    for name, e, g in zip([o.name for o in model.graph.output], expected, got):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=1e-4, atol=1e-4, err_msg=name)


def test_parameters_and_buffers():
    module = build_module(model_cnn())
    onnx_names = {v: k for k, v in module.param_names.items()}
    assert set(onnx_names.values()) == {"w1", "b1", "bn_s", "bn_b", "w2", "wt", "bt", "wg", "bg", "wm"}
    assert all("." not in k for k in module.params)
    trainable = {id(p) for p in module.parameters()}
    assert len(trainable) == 10  # BN statistics and arithmetic constants are buffers


@pytest.mark.parametrize("terms", [1, 2])
def test_compressed_model_matches_onnxruntime(small_model, terms):
    import onnxstack

    x = RNG.standard_normal((2, 8, 12, 12)).astype(np.float32)
    for form in ("dense", "lean", "stacked"):
        result = onnxstack.compress(small_model, onnxstack.CompressConfig(slice_dim=4, execution=form, terms=terms))
        got = build_module(result.model)(torch.from_numpy(x))[0].detach().numpy()
        np.testing.assert_allclose(got, run_ort(result.model, {"input": x})[0], rtol=1e-4, atol=1e-4)


def test_shared_weights_share_parameters():
    import onnxstack

    model = conv_model([{"in": 8, "out": 8}, {"out": 8}, {"out": 8}], share={2: 1})
    result = onnxstack.compress(model, onnxstack.CompressConfig(slice_dim=4))
    module = build_module(result.model)
    layers = list(module.layers.values())
    assert layers[1].latent is layers[2].latent and layers[1].scales is layers[2].scales
    assert layers[1].bias is not layers[2].bias


def test_unsupported_ops_are_named():
    nodes = [N("Relu", ["x"], ["a"]), N("Einsum", ["a", "a"], ["b"], equation="ij,ij->ij", name="e1"),
             N("Bar", ["b"], ["y"], domain="com.foo", name="custom")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.foo", 1)])
    with pytest.raises(UnsupportedOpError, match=r"2 operator\(s\).*Einsum \(node e1\).*com\.foo\.Bar \(node custom\)"):
        OnnxModule(model)


def test_unsupported_attribute_is_named():
    model = graph_model([N("Resize", ["x", "", "sc"], ["y"], mode="cubic", name="up")], [("x", [1, 1, 3, 3])], ["y"],
                        [const("sc", [1, 1, 2, 2])], 17)
    with pytest.raises(UnsupportedOpError, match=r"node 'up' \(Resize\): unsupported mode='cubic'"):
        build_module(model)(torch.zeros(1, 1, 3, 3))


# --- the trainable layer ------------------------------------------------------------------------------

LAYER_CASES = [
    dict(N=8, C=16, k=3, d=16, m=4),
    dict(N=8, C=10, k=3, d=4, m=5, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
    dict(N=6, C=7, k=1, d=3, m=2, bias=False),
    dict(N=5, C=12, k=(3, 1), d=5, m=9, auto_pad="SAME_UPPER"),
    dict(N=4, C=9, k=5, d=9, m=3, auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(N=8, C=8, k=2, d=2, m=16, auto_pad="VALID"),
    dict(N=12, C=6, k=3, d=1, m=11, per_filter=True, pads=[1, 1, 1, 1]),
    dict(N=8, C=12, k=3, d=4, m=6, group=2, pads=[1, 1, 1, 1]),
    dict(N=6, C=15, k=3, d=4, m=7, group=3, strides=[2, 2], per_filter=True),
    dict(N=8, C=10, k=3, d=4, m=9, terms=2, pads=[1, 1, 1, 1]),
    dict(N=6, C=12, k=3, d=4, m=5, terms=3, per_filter=True, strides=[2, 2]),
    dict(N=4, C=8, k=1, d=8, m=3, terms=1, rank3=True),
]


def stored(N, C, k, d, m, *, bias=True, per_filter=False, group=1, terms=None, rank3=False, seed=0, **attrs):
    """Random stored tensors of one layer: rank-2 indices / scales, or rank 3 with `terms` (k) terms."""
    rng = np.random.default_rng(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    cg = C // group
    s = -(-cg // d)
    extra = (terms,) if terms else ()
    t = {"codebook": pack_codebook(np.where(rng.standard_normal((m, d * kh * kw)) > 0, 1, -1), (d, kh, kw)),
         "indices": rng.integers(0, m, (N, s, *extra)).astype(index_dtype(m)),
         "scales": rng.standard_normal((N, 1 if per_filter else s, *extra)).astype(np.float16),
         "B": rng.standard_normal(N).astype(np.float32) if bias else None}
    return t, dict(attrs, group=group, kernel_shape=[kh, kw]), cg


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layer_matches_numpy_reference(case):
    t, attrs, cg = stored(**case)
    x = RNG.standard_normal((2, case["C"], 9, 11)).astype(np.float32)
    expected = op.stacked_binary_conv(x, t["codebook"], t["indices"], t["scales"], t["B"], channels=cg, **attrs)
    layer = StackedBinaryConv2d(t["codebook"], t["indices"], t["scales"], t["B"], channels=cg, **attrs)
    got = layer(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    got.square().sum().backward()
    assert layer.latent.grad.abs().sum() > 0 and layer.scales.grad.abs().sum() > 0
    assert layer.bias is None or layer.bias.grad.abs().sum() > 0
    back = layer.stored_tensors()
    for role in ("codebook", "indices", "scales"):
        np.testing.assert_array_equal(back[role], t[role])
        assert back[role].dtype == t[role].dtype


DECODE_CASES = [  # N, C, d, kernel, m: padding where d does not divide C, none where it does
    (5, 20, 8, (3, 3), 11),
    (4, 7, 3, (1, 1), 5),
    (3, 16, 16, (3, 2), 9),
    (6, 12, 4, (2, 2), 17),
]


@pytest.mark.parametrize("scale", ["slice", "filter"])
@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("N, C, d, kernel, m", DECODE_CASES)
def test_torch_decode_equals_numpy_decode(N, C, d, kernel, m, terms, scale):
    """The bridge's one torch decode (layers.decode_weight, and so the layer's weight()) equals the numpy
    decode BinaryFit.decode followed by from_slices, for 1 and 2 terms and per-slice / per-filter scales."""
    from onnxstack.core.fit import BinaryFit, from_slices
    from onnxstack.torch_bridge.layers import decode_weight

    rng = np.random.default_rng([N, C, d, m, terms])
    kh, kw = kernel
    s, D = -(-C // d), d * kh * kw
    codebook = np.where(rng.standard_normal((m, D)) > 0, 1, -1).astype(np.int8)  # (m, D)
    indices = rng.integers(0, m, (N, s, terms))  # (N, s, k)
    scales = rng.standard_normal((N, s if scale == "slice" else 1, terms)).astype(np.float16)  # (N, s|1, k)
    expected = from_slices(BinaryFit(codebook, indices, scales.astype(np.float32)).decode(), C, kernel)
    assert expected.shape == (N, C, kh, kw)

    got = decode_weight(torch.from_numpy(codebook.astype(np.float32).reshape(m, d, kh, kw)), torch.from_numpy(indices),
                        torch.from_numpy(scales.astype(np.float32)), C)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)

    forms = [(indices, scales)] + ([(indices[:, :, 0], scales[:, :, 0])] if terms == 1 else [])  # + the rank-2 form
    for idx, sc in forms:
        layer = StackedBinaryConv2d(pack_codebook(codebook, (d, kh, kw)), idx.astype(index_dtype(m)), sc, channels=C)
        np.testing.assert_allclose(layer.weight().detach().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_reassign_keeps_the_best_indices():
    t, attrs, cg = stored(N=8, C=8, k=3, d=4, m=8)
    layer = StackedBinaryConv2d(t["codebook"], t["indices"], t["scales"], channels=cg, **attrs)
    w = layer.weight().detach()
    assert layer.reassign(w) == 0  # the decoded weight is its own best fit
    before = layer.indices.clone()  # (N, s, 1)
    assert layer.reassign(-w) == 0 and torch.equal(layer.indices, before)  # per-slice scales carry the sign
    books = layer.codewords().detach()
    target = books[(before + 1) % 8].reshape(8, -1, 3, 3)[:, :cg] * 0.5  # every slice now fits another codeword
    assert layer.reassign(target) == before.numel()
    torch.testing.assert_close(layer.weight().detach(), target, rtol=1e-3, atol=1e-3)


def test_reassign_two_terms_and_latent_init():
    t, attrs, cg = stored(N=6, C=8, k=3, d=4, m=16, terms=2)
    layer = StackedBinaryConv2d(t["codebook"], t["indices"], t["scales"], channels=cg, **attrs)
    w = layer.weight().detach()
    assert layer.reassign(w) == 0
    layer.init_latent(w, 0.1)
    assert torch.equal(layer.codewords(), StackedBinaryConv2d(t["codebook"], t["indices"], t["scales"],
                                                              channels=cg, **attrs).codewords())  # signs kept
    used = torch.unique(layer.indices)
    assert 0 < layer.latent[used].abs().max() <= 1.0


def test_import_onnxstack_does_not_import_torch():
    code = "import sys, onnxstack, onnxstack.api, onnxstack.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_other_local_functions_are_inlined():
    body = [N("Mul", ["a", "a"], ["sq"]), N("Sigmoid", ["sq"], ["b"])]
    fn = helper.make_function("com.me", "SigSq", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    nodes = [N("SigSq", ["x"], ["h"], domain="com.me"), N("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, functions=[fn], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.me", 1)])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    got = build_module(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, run_ort(model, {"x": x})[0], rtol=1e-5)


def test_support_doc_lists_every_bridge_operator():
    """docs/SUPPORT.md's fine-tuning section names exactly the operators the bridge builds."""
    import re
    from pathlib import Path

    from onnxstack.torch_bridge.ops import OPS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "SUPPORT.md").read_text()
    section = doc.split("## Fine-tuning (the torch bridge)")[1].split("\n## ")[0]
    listed = next(p for p in section.split("\n\n") if p.startswith(("Abs", "Add"))).rstrip(".\n")
    assert sorted(re.split(r",\s*", listed.replace("\n", " "))) == sorted(OPS)
