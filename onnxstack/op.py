"""The StackedBinaryConv custom op, defined once, with its implementations.

    Y = Conv(X, W_hat, B)  with  W_hat[i, j*d:(j+1)*d] = sum_q scales[i, j, q] * codeword[indices[i, j, q]]

Inputs
    X         float32 (B, C, H, W)
    codebook  uint8 (ceil(m/8), d, kh, kw)  packed +-1 codewords (layout: core.bits)
    indices   uint8 / uint16 (N, s[, k])     codewords of each filter slice, s = ceil(channels/d); k stacked
                                             terms a slice (rank 2: k = 1, the paper's form)
    scales    float16 (N, s|1[, k])           per-slice or per-filter scale of each term (sign included)
    B         float32 (N,), optional          bias
Attributes
    channels  int, required: input channels of the weight (C / group); slices past it are padding
    auto_pad, dilations, group, kernel_shape, pads, strides: as ONNX Conv. make_node sets every one the
        function reads (channels, auto_pad, dilations, group, pads, strides), Conv's defaults included, so
        that consumers which do not drop unset referenced attributes (onnx's ReferenceEvaluator) run the
        file too; auto_pad VALID, and SAME_* at stride 1, become explicit pads. kernel_shape is optional
        (the codebook's kernel is the kernel) and not read by the function.

Implementations that tests prove agree:
  - `stacked_binary_conv`: numpy, the specification (and `StackedBinaryConvRef`, its OpRun
    adapter for onnx.reference.ReferenceEvaluator);
  - `make_function(overload, opset)`: the model-local ONNX function that stock onnxruntime runs, one
    overload a form (the decoding forms have a second one, "<form>.padded", with a Slice that cuts the
    last slice's padding; a node calls it only where channels % d != 0, since onnxruntime folds the Slice
    into one more copy of the weight):
      "dense": decode W_hat, one Conv. onnxruntime constant-folds the decode once, at session start,
        into a float weight, so it runs as fast as the original; the body keeps the folded chain to three
        weight-sized tensors (Gather of codeword rows, the scaled sum of the terms, the 4-D reshape), as
        each one is held while the session folds (bench/inference_speed.py measures the session memory);
      "lean": the same decode, made to depend on X's values (an int64 zero from one element of X) so
        that nothing weight-sized is folded: the weight is decoded at every run and freed after its Conv,
        and the session holds only the packed tensors (less memory than the original, slower);
      "stacked": a Conv of the d-channel groups with the codebook, then a 1x1 Conv with the sparse
        (N, s*m) merge matrix; group must be 1;
  - the torch module of the fine-tuning bridge.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun

from .core.bits import unpack_codebook
from .core.conv import conv2d
from .core.fit import decode

DOMAIN = "com.onnxstack"
OP_TYPE = "StackedBinaryConv"
VERSION = 1
FORMS = ("dense", "lean", "stacked")
PADDED = ".padded"  # overload suffix of the decoding forms where the last slice is padded (channels % d != 0)
OVERLOADS = ("dense", "dense" + PADDED, "lean", "lean" + PADDED, "stacked")
INPUTS = ["X", "codebook", "indices", "scales", "B"]
CONV_ATTRS = {
    "auto_pad": onnx.AttributeProto.STRING,
    "dilations": onnx.AttributeProto.INTS,
    "group": onnx.AttributeProto.INT,
    "kernel_shape": onnx.AttributeProto.INTS,
    "pads": onnx.AttributeProto.INTS,
    "strides": onnx.AttributeProto.INTS,
}
FUNCTION_ATTRS = ("channels", "auto_pad", "dilations", "group", "pads", "strides")  # what the bodies read
MIN_OPSET = 12  # Constant(value_int) reads the `channels` attribute


def decode_weight(codebook: np.ndarray, indices: np.ndarray, scales: np.ndarray, channels: int) -> np.ndarray:
    """(N, channels, kh, kw) float32 weight from the stored tensors."""
    if indices.ndim not in (2, 3) or scales.ndim != indices.ndim or scales.shape[0] != indices.shape[0]:
        raise ValueError(f"indices.shape={indices.shape}, scales.shape={scales.shape} must be (N, s[, k]) "
                         "and (N, s|1[, k])")
    idx = indices.reshape(*indices.shape[:2], -1)  # (N, s, k)
    sc = scales.reshape(*scales.shape[:2], -1).astype(np.float32)  # (N, s|1, k)
    if sc.shape[1] not in (1, idx.shape[1]) or sc.shape[2] != idx.shape[2]:
        raise ValueError(f"scales.shape={scales.shape} does not fit indices.shape={indices.shape}")
    books = unpack_codebook(codebook)  # (M', d, kh, kw)
    if idx.size and int(idx.max()) >= len(books):
        raise ValueError(f"index {int(idx.max())} out of range for {len(books)} codewords")
    N, s, _ = idx.shape
    d = books.shape[1]
    if not (s - 1) * d < channels <= s * d:
        raise ValueError(f"channels={channels} does not match s={s} slices of depth d={d}")
    w = decode(books.reshape(len(books), -1), idx.astype(np.int64), sc)  # (N, s, d*kh*kw)
    return w.reshape(N, s * d, *books.shape[2:])[:, :channels]


def stacked_binary_conv(X, codebook, indices, scales, B=None, *, channels, auto_pad="NOTSET",
                        dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """The specification: decode the weight, then ONNX Conv semantics."""
    if X.ndim != 4 or X.shape[1] != channels * group:
        raise ValueError(f"X.shape={X.shape} does not fit channels={channels}, group={group}")
    W = decode_weight(codebook, indices, scales, channels)
    if kernel_shape is not None and list(kernel_shape) != list(W.shape[2:]):
        raise ValueError(f"kernel_shape={list(kernel_shape)} but codebook kernel is {list(W.shape[2:])}")
    return conv2d(X, W, B, strides=strides, pads=pads, dilations=dilations, group=group, auto_pad=auto_pad)


class StackedBinaryConvRef(OpRun):
    """OpRun adapter: ReferenceEvaluator(model, new_ops=[StackedBinaryConvRef])."""

    op_domain = DOMAIN

    def _run(self, X, codebook, indices, scales, B=None, channels=None, auto_pad=None, dilations=None,
             group=None, kernel_shape=None, pads=None, strides=None):
        if channels is None:
            raise ValueError("StackedBinaryConv needs the 'channels' attribute")
        return (stacked_binary_conv(X, codebook, indices, scales, B, channels=channels,
                                    auto_pad=auto_pad or "NOTSET", dilations=dilations, group=group or 1,
                                    kernel_shape=kernel_shape, pads=pads, strides=strides),)


StackedBinaryConvRef.__name__ = OP_TYPE  # OpRun classes are looked up by op_type


def overload(form: str, channels: int, slice_dim: int | None) -> str:
    """The function overload a node of `form` calls: the decoding forms cut the padded weight to `channels`
    with a Slice, which costs a folded copy of the weight; where nothing is padded they call the overload
    without it (slice_dim None: unknown, the padded one, right for every layer)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    padded = slice_dim is None or channels % slice_dim != 0
    return form + PADDED if form != "stacked" and padded else form


def form_of(overload_name: str) -> str:
    return overload_name.removesuffix(PADDED)


def make_node(inputs: list[str], output: str, name: str, form: str, channels: int, conv_attrs: dict,
              slice_dim: int | None = None) -> onnx.NodeProto:
    """A StackedBinaryConv node calling the `form` overload of the function (see `overload`), every attribute
    the function reads set (see node_attributes)."""
    inputs = list(inputs) + [""] * (len(INPUTS) - len(inputs))  # no bias: B named "" (omitted), not left off
    node = helper.make_node(OP_TYPE, inputs, [output], name=name, domain=DOMAIN,
                            **node_attributes(channels, conv_attrs))
    node.overload = overload(form, channels, slice_dim)
    return node


def node_attributes(channels: int, conv_attrs: dict) -> dict:
    """The node's attributes: 2-D Conv attributes with ONNX's defaults written out.

    A function body refers to the node's attributes; a consumer that cannot leave an unset one out
    (onnx.reference.ReferenceEvaluator raises on it) needs each of them set. auto_pad VALID is pads 0;
    SAME_UPPER / SAME_LOWER at stride 1 pad d*(k-1) in total (the extra one at the end / the start),
    whatever the input size, and become explicit pads when the kernel is known. SAME at larger strides
    depends on the input size: auto_pad stays, pads stay unset (onnxruntime runs it; the reference
    evaluator cannot)."""
    a = dict(conv_attrs)
    kernel = a.get("kernel_shape")
    dil = list(a.get("dilations") or [1, 1])
    strides = list(a.get("strides") or [1, 1])
    auto_pad = a.get("auto_pad") or "NOTSET"
    pads = a.get("pads")
    if auto_pad == "VALID":
        auto_pad, pads = "NOTSET", [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER") and kernel is not None and all(s == 1 for s in strides):
        total = [d * (k - 1) for d, k in zip(dil, kernel)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - b for t, b in zip(total, small)]
        auto_pad, pads = "NOTSET", begin + [t - b for t, b in zip(total, begin)]
    out = {"channels": channels, "auto_pad": auto_pad, "dilations": dil, "group": int(a.get("group", 1)),
           "strides": strides}
    if auto_pad == "NOTSET":
        out["pads"] = list(pads or [0, 0, 0, 0])
    if kernel is not None:
        out["kernel_shape"] = list(kernel)
    return out


def make_function(name: str, opset: int) -> onnx.FunctionProto:
    """The model-local function of one overload (a form, or a decoding form + PADDED), its body in standard
    ops of `opset` (>= 12)."""
    if opset < MIN_OPSET:
        raise ValueError(f"StackedBinaryConv needs opset >= {MIN_OPSET}, got {opset}")
    if name not in OVERLOADS:
        raise ValueError(f"overload must be one of {OVERLOADS}, got {name!r}")
    b = _Body()
    W4 = _decode_codebook(b)  # (M', d, kh, kw) float
    form, padded = form_of(name), name.endswith(PADDED)
    if form == "dense":
        _dense(b, W4, padded)
    elif form == "lean":
        _lean(b, W4, opset, padded)
    else:
        _stacked(b, W4)
    fn = helper.make_function(
        DOMAIN, OP_TYPE, INPUTS, ["Y"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=list(FUNCTION_ATTRS),
    )
    fn.overload = name
    fn.doc_string = f"StackedBinaryConv v{VERSION}, {name} form (see onnxstack.op)."
    return fn


class _Body:
    """Collects function-body nodes with short unique names."""

    def __init__(self, prefix: str = "t"):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix

    def op(self, op_type, inputs, out=None, **attrs):
        out = out or f"{self.prefix}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, values, dtype=np.int64):
        arr = np.asarray(values, dtype=dtype)
        return self.op("Constant", [], value=onnx.numpy_helper.from_array(arr))

    def ref(self, op_type, inputs, attr_names, out=None, **attrs):
        """A node whose attributes come from the function's attributes of the same names."""
        out = self.op(op_type, inputs, out, **attrs)
        node = self.nodes[-1]
        for name in attr_names:
            node.attribute.append(helper.make_attribute_ref(name, CONV_ATTRS[name]))
        return out

    def part(self, shape, start, end):
        return self.op("Slice", [shape, self.const([start]), self.const([end])])


def _decode_codebook(b: _Body) -> str:
    """uint8 (M8, d, kh, kw) -> float +-1 (8*M8, d, kh, kw); bit k is (x << (7-k)) >> 7."""
    left = b.op("BitShift", ["codebook", b.const(np.arange(7, -1, -1).reshape(8, 1, 1, 1, 1), np.uint8)],
                direction="LEFT")  # (8, M8, d, kh, kw)
    bit = b.op("BitShift", [left, b.const([7], np.uint8)], direction="RIGHT")
    pm = b.op("Sub", [b.op("Mul", [b.op("Cast", [bit], to=TensorProto.FLOAT), b.const([2.0], np.float32)]),
                      b.const([1.0], np.float32)])
    cb_shape = b.op("Shape", ["codebook"])
    return b.op("Reshape", [pm, b.op("Concat", [b.const([-1]), b.part(cb_shape, 1, 4)], axis=0)])


def _channels(b: _Body) -> str:
    """1-D int64 [channels] from the attribute."""
    node = helper.make_node("Constant", [], ["channels_scalar"])
    node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT))
    node.attribute[-1].ref_attr_name = "channels"
    b.nodes.append(node)
    return b.op("Reshape", ["channels_scalar", b.const([1])])


def _terms(b: _Body):
    """indices as int64 (N, s, k) and scales as float (N, s|1, 1, k), for rank-2 and rank-3 inputs."""
    idx = b.op("Reshape", [b.op("Cast", ["indices"], to=TensorProto.INT64), b.const([0, 0, -1])])
    sc = b.op("Reshape", [b.op("Cast", ["scales"], to=TensorProto.FLOAT), b.const([0, 0, 1, -1])])
    return idx, sc


def _table(b: _Body, W4: str) -> tuple[str, str]:
    """The codewords as rows (M', d*kh*kw), and the 1-D kernel shape [kh, kw]."""
    w_shape = b.op("Shape", [W4])
    table = b.op("Reshape", [W4, b.op("Concat", [b.part(w_shape, 0, 1), b.const([-1])], axis=0)])
    return table, b.part(w_shape, 2, 4)


def _conv(b: _Body, flat: str, kernel: str, padded: bool) -> None:
    """Y = Conv(X, W) with W the (N, s, d*kh*kw) decoded slices reshaped, and cut to `channels` if padded."""
    weight = b.op("Reshape", [flat, b.op("Concat", [b.const([0, -1]), kernel], axis=0)])  # (N, s*d, kh, kw)
    if padded:
        weight = b.op("Slice", [weight, b.const([0]), _channels(b), b.const([1])])
    b.ref("Conv", ["X", weight, "B"], [a for a in FUNCTION_ATTRS if a != "channels"], out="Y")


def _dense(b: _Body, W4: str, padded: bool) -> None:
    table, kernel = _table(b, W4)
    idx, sc = _terms(b)
    picked = b.op("Gather", [table, idx], axis=0)  # (N, s, k, D)
    summed = b.op("MatMul", [sc, picked])  # (N, s, 1, D): the scaled sum of the terms
    _conv(b, summed, kernel, padded)


def _lean(b: _Body, W4: str, opset: int, padded: bool) -> None:
    """Decode at run time. One stored term a slice (rank-2 indices, the default) is a Gather and a Mul;
    k terms add a ReduceSum (onnxruntime's is slow on the middle axis); an If on the rank of `indices`
    picks the branch."""
    table, kernel = _table(b, W4)
    one = b.op("Slice", ["X", b.const([0, 0, 0, 0]), b.const([1, 1, 1, 1])])  # X's first value
    zero = b.op("Cast", [b.op("Less", [one, one])], to=TensorProto.INT64)  # 0, known only at run time
    idx = b.op("Add", [b.op("Cast", ["indices"], to=TensorProto.INT64), b.op("Reshape", [zero, b.const([1, 1])])])
    sc = b.op("Expand", [b.op("Cast", ["scales"], to=TensorProto.FLOAT), b.op("Shape", [idx])])  # idx's shape
    rank = b.op("Size", [b.op("Shape", ["indices"])])
    single = b.op("Equal", [rank, b.const(2)])

    def branch(name: str, terms: int) -> onnx.GraphProto:
        """terms=1: (N, s) indices -> Gather, Mul; else (N, s, k) -> Gather, Mul, ReduceSum. The shapes are
        written so that either branch type-checks for either rank (shape inference visits both)."""
        sub = _Body(prefix=f"{name}_")
        if terms == 1:
            picked = sub.op("Gather", [table, sub.op("Reshape", [idx, sub.const([0, -1])])], axis=0)  # (N, s, D)
            return _graph(sub, name, sub.op("Mul", [picked, sub.op("Reshape", [sc, sub.const([0, -1, 1])])]))
        picked = sub.op("Gather", [table, sub.op("Reshape", [idx, sub.const([0, 0, -1])])], axis=0)  # (N, s, k, D)
        scaled = sub.op("Mul", [picked, sub.op("Reshape", [sc, sub.const([0, 0, -1, 1])])])
        return _graph(sub, name, sub.op("ReduceSum", [scaled, sub.const([2])], keepdims=0) if opset >= 13
                      else sub.op("ReduceSum", [scaled], axes=[2], keepdims=0))

    flat = b.op("If", [single], then_branch=branch("one", 1), else_branch=branch("many", 2))
    _conv(b, flat, kernel, padded)


def _graph(b: _Body, name: str, out: str) -> onnx.GraphProto:
    return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def _stacked(b: _Body, W4: str) -> None:
    x_shape = b.op("Shape", ["X"])
    w_shape = b.op("Shape", [W4])
    idx_shape = b.op("Shape", ["indices"])
    s = b.part(idx_shape, 1, 2)
    d, m = b.part(w_shape, 1, 2), b.part(w_shape, 0, 1)
    # X (B, C, H, W) -> zero-pad C to s*d -> (B*s, d, H, W); one Conv with the codebook
    pad_c = b.op("Sub", [b.op("Mul", [s, d]), _channels(b)])
    pads = b.op("Concat", [b.const([0, 0, 0, 0, 0]), pad_c, b.const([0, 0])], axis=0)
    xp = b.op("Pad", ["X", pads])
    xg = b.op("Reshape", [xp, b.op("Concat", [b.const([-1]), d, b.part(x_shape, 2, 4)], axis=0)])
    maps = b.ref("Conv", [xg, W4], ["auto_pad", "dilations", "pads", "strides"])
    maps = b.op("Reshape", [maps, b.op("Concat", [b.part(x_shape, 0, 1), b.const([-1]),
                                                   b.part(b.op("Shape", [maps]), 2, 4)], axis=0)])
    # merge: (N, s*M') matrix, row i holds sum_q scales[i, j, q] at column j*M' + indices[i, j, q]
    idx, sc = _terms(b)
    depth = b.op("Reshape", [m, b.const(np.zeros(0, np.int64))])  # a scalar, as every OneHot reads it
    onehot = b.op("OneHot", [idx, depth, b.const([0.0, 1.0], np.float32)], axis=-1)  # (N, s, k, M')
    merge = b.op("Reshape", [b.op("MatMul", [sc, onehot]), b.const([0, -1, 1, 1])])  # (N, s*M', 1, 1)
    b.op("Conv", [maps, merge, "B"], out="Y")
