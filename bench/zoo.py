"""Benchmark model zoo: ResNet-18, ResNet-50, VGG-16 and MobileNetV2 built with onnx.helper.

    python bench/zoo.py [--models resnet18 resnet50 vgg16 mobilenetv2] [--image-size 224]

The architectures follow torchvision's (ResNet v1.5: the stride sits in the bottleneck's 3x3 conv),
exported as a real eval-mode export is: BatchNorm folded into Conv + bias, ReLU6 as Clip, opset 17,
input `input` (N, 3, H, W) with a dynamic batch N, output `logits` (N, 1000). Weights are random and
seeded: He-normal (std = sqrt(2 / fan_in)); the last conv of each residual branch is scaled by 0.2 so
activations stay O(1) through the residual sums, as a trained network's folded BatchNorm keeps them.
Random weights are fine for speed and memory; they say nothing about accuracy.

Models are cached in $ONNXSTACK_BENCH_CACHE or ~/.cache/onnxstack-bench/ (VGG-16 is 528 MB).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
RESIDUAL_GAIN = 0.2
MODELS = ("resnet18", "resnet50", "vgg16", "mobilenetv2")


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXSTACK_BENCH_CACHE") or Path.home() / ".cache" / "onnxstack-bench")


class _Graph:
    """Collects nodes and He-initialised initializers; tracks channels and spatial size."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count: dict[str, int] = {}

    def name(self, kind: str) -> str:
        self.count[kind] = self.count.get(kind, 0) + 1
        return f"{kind}_{self.count[kind]}"

    def tensor(self, name: str, shape, std: float) -> str:
        arr = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, act: str | None = "relu",
             gain: float = 1.0) -> str:
        """Conv (BatchNorm folded: weight + bias) and its activation ("relu", "relu6" or None)."""
        name = self.name("conv")
        fan_in = cin // group * k * k
        w = self.tensor(f"{name}.weight", (cout, cin // group, k, k), gain * np.sqrt(2.0 / fan_in))
        b = self.tensor(f"{name}.bias", (cout,), 0.01)
        self.nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4, group=group))
        if act == "relu":
            return self.op("Relu", [name])
        if act == "relu6":
            lo, hi = self.scalar(0.0), self.scalar(6.0)
            return self.op("Clip", [name, lo, hi])
        return name

    def scalar(self, value: float) -> str:
        name = f"const_{value:g}"
        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def gemm(self, x: str, fin: int, fout: int, relu: bool = False) -> str:
        name = self.name("fc")
        w = self.tensor(f"{name}.weight", (fout, fin), np.sqrt((2.0 if relu else 1.0) / fin))
        b = self.tensor(f"{name}.bias", (fout,), 0.01)
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [name], name=name, transB=1))
        return self.op("Relu", [name]) if relu else name

    def head(self, x: str, channels: int, classes: int = 1000) -> str:
        pooled = self.op("GlobalAveragePool", [x])
        return self.gemm(self.op("Flatten", [pooled], axis=1), channels, classes)

    def model(self, name: str, out: str, image_size: int) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "logits"
        for node in self.nodes:  # the renamed output may be read by nobody else; keep the graph consistent
            node.input[:] = ["logits" if i == out else i for i in node.input]
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image_size, image_size])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])
        graph = helper.make_graph(self.nodes, name, [x], [y], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxstack-bench-zoo")
        model.ir_version = 8
        return model


def _stem(g: _Graph) -> str:
    x = g.conv("input", 3, 64, 7, stride=2)
    return g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


def _basic(g: _Graph, x: str, cin: int, cout: int, stride: int) -> str:
    y = g.conv(x, cin, cout, 3, stride)
    y = g.conv(y, cout, cout, 3, act=None, gain=RESIDUAL_GAIN)
    short = g.conv(x, cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else x
    return g.op("Relu", [g.op("Add", [y, short])])


def _bottleneck(g: _Graph, x: str, cin: int, width: int, stride: int) -> str:
    cout = 4 * width
    y = g.conv(x, cin, width, 1)
    y = g.conv(y, width, width, 3, stride)
    y = g.conv(y, width, cout, 1, act=None, gain=RESIDUAL_GAIN)
    short = g.conv(x, cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else x
    return g.op("Relu", [g.op("Add", [y, short])])


def resnet(depth: int, image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 (basic blocks [2, 2, 2, 2]) or ResNet-50 (bottlenecks [3, 4, 6, 3])."""
    blocks, block, expansion = {18: ([2, 2, 2, 2], _basic, 1), 50: ([3, 4, 6, 3], _bottleneck, 4)}[depth]
    g = _Graph(seed)
    x, cin = _stem(g), 64
    for stage, n in enumerate(blocks):
        width = 64 << stage
        for i in range(n):
            x = block(g, x, cin, width, 2 if stage > 0 and i == 0 else 1)
            cin = width * expansion
    return g.model(f"resnet{depth}", g.head(x, cin), image_size)


def vgg16(image_size: int = 224, seed: int = 0, hidden: int = 4096) -> onnx.ModelProto:
    """VGG-16 (configuration D, no BatchNorm): 13 3x3 convs, 5 max-pools, 3 fully connected layers
    (`hidden` wide; smaller only to keep tests light)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    g = _Graph(seed)
    x, cin, size = "input", 3, image_size
    for v in cfg:
        if v == "M":
            x, size = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), size // 2
        else:
            x, cin = g.conv(x, cin, v, 3), v
    x = g.op("Flatten", [x], axis=1)  # torchvision's adaptive 7x7 pool is the identity at 224
    x = g.gemm(x, cin * size * size, hidden, relu=True)
    x = g.gemm(x, hidden, hidden, relu=True)
    return g.model("vgg16", g.gemm(x, hidden, 1000), image_size)


def mobilenetv2(image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): inverted residuals with depthwise 3x3 convs, ReLU6 as Clip."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # expansion t, channels c, repeats n, first stride s
    g = _Graph(seed)
    x, cin = g.conv("input", 3, 32, 3, stride=2, act="relu6"), 32
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = g.conv(x, cin, hidden, 1, act="relu6") if t != 1 else x
            y = g.conv(y, hidden, hidden, 3, stride, group=hidden, act="relu6")
            y = g.conv(y, hidden, c, 1, act=None, gain=RESIDUAL_GAIN if stride == 1 and cin == c else 1.0)
            x = g.op("Add", [y, x]) if stride == 1 and cin == c else y
            cin = c
    x = g.conv(x, cin, 1280, 1, act="relu6")
    return g.model("mobilenetv2", g.head(x, 1280), image_size)


BUILDERS = {
    "resnet18": lambda size, seed: resnet(18, size, seed),
    "resnet50": lambda size, seed: resnet(50, size, seed),
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
}


def build(name: str, image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """The model in memory (not cached)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    return BUILDERS[name](image_size, seed)


def model_path(name: str, image_size: int = 224, seed: int = 0) -> Path:
    """Path of the cached model, built and saved on first use (atomically)."""
    path = cache_dir() / f"{name}-{image_size}-seed{seed}.onnx"
    if not path.is_file():
        model = build(name, image_size, seed)
        onnx.checker.check_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return path


def conv_macs(model: onnx.ModelProto, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates of every Conv node (by name) for one batch, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(_with_batch(model, batch))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output)}
    inits = {t.name: t.dims for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            n, cg, kh, kw = inits[node.input[1]]
            _, _, h, w = shapes[node.output[0]]
            out[node.name] = batch * h * w * n * cg * kh * kw
    return out


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in args.models:
        path = model_path(name, args.image_size, args.seed)
        model = onnx.load(str(path))
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        gmacs = sum(conv_macs(model).values()) / 1e9
        convs = sum(n.op_type == "Conv" for n in model.graph.node)
        print(f"{name:12s} {convs:3d} convs  {params / 1e6:7.2f} M params  {gmacs:6.2f} GMAC (convs)  "
              f"{path.stat().st_size / 2**20:7.1f} MiB  {path}")


if __name__ == "__main__":
    main()
