"""Real CNN architectures in torch, narrow enough for CI, and their ONNX exports.

Every model keeps the structure of the architecture it is named after (blocks, strides, skips,
activations, heads) with widths cut down so that a whole suite compresses in minutes on 2 cores.

    model = export(build("resnet18"), exporter="legacy", opset=13)   # an onnx.ModelProto

Exports use both torch exporters: "legacy" (TorchScript, torch.onnx.export(dynamo=False)) and
"dynamo" (torch.export + onnxscript). The dynamo exporter writes opset 18 or newer and converts down
with onnx's version converter; where that conversion fails it keeps opset 18 (so "dynamo at opset
11" may be an opset-18 model: the tests read the opset from the file, not from the request).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

# --- building blocks -------------------------------------------------------------------------------


def conv_bn(c_in, c_out, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, width, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, width, 3, stride), conv_bn(width, width, 3, act=None))
        self.short = (conv_bn(c_in, width, 1, stride, act=None) if stride != 1 or c_in != width else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride):
        super().__init__()
        out = width * 4
        self.body = nn.Sequential(conv_bn(c_in, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, out, 1, act=None))
        self.short = conv_bn(c_in, out, 1, stride, act=None) if stride != 1 or c_in != out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, four stages, global pool, fc), widths / 8."""

    def __init__(self, block, depths, widths=(8, 16, 32, 64), classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(depths, widths)):
            for j in range(n):
                stages.append(block(c, w, 2 if j == 0 and i > 0 else 1))
                c = w * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class VGG(nn.Module):
    """VGG-16 with batch norm (13 convs, 5 max-pools), widths / 16, a small classifier."""

    CFG = (4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M")

    def __init__(self, classes=10):
        super().__init__()
        layers, c = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(c, v))
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
                   conv_bn(hidden, c_out, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2's (t, c, n, s) table at width 0.25, channels rounded to multiples of 4."""

    TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes=10, width=0.25):
        super().__init__()
        ch = lambda c: max(4, int(c * width + 2) // 4 * 4)  # noqa: E731
        layers, c = [conv_bn(3, ch(32), 3, 2, act=nn.ReLU6)], ch(32)
        for t, co, n, s in self.TABLE:
            for i in range(n):
                layers.append(InvertedResidual(c, ch(co), s if i == 0 else 1, t))
                c = ch(co)
        layers.append(conv_bn(c, ch(1280), 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch(1280), classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class C2f(nn.Module):
    """YOLOv8's split / bottlenecks / concat block."""

    def __init__(self, c_in, c_out, n=1):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = conv_bn(c_in, 2 * self.c, 1, act=nn.SiLU)
        self.m = nn.ModuleList(nn.Sequential(conv_bn(self.c, self.c, 3, act=nn.SiLU), conv_bn(self.c, self.c, 3, act=nn.SiLU))
                               for _ in range(n))
        self.cv2 = conv_bn((2 + n) * self.c, c_out, 1, act=nn.SiLU)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.cv1 = conv_bn(c_in, c_in // 2, 1, act=nn.SiLU)
        self.cv2 = conv_bn(c_in * 2, c_out, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloLite(nn.Module):
    """A YOLOv8-style detector: C2f backbone, SPPF, FPN/PAN neck with Upsample + Concat, three heads
    (strides 8, 16, 32), each giving (B, 4 + classes, H, W)."""

    def __init__(self, classes=3, w=(8, 16, 32, 64, 64)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, w[0], 3, 2, act=nn.SiLU), conv_bn(w[0], w[1], 3, 2, act=nn.SiLU), C2f(w[1], w[1]))
        self.p3 = nn.Sequential(conv_bn(w[1], w[2], 3, 2, act=nn.SiLU), C2f(w[2], w[2]))
        self.p4 = nn.Sequential(conv_bn(w[2], w[3], 3, 2, act=nn.SiLU), C2f(w[3], w[3]))
        self.p5 = nn.Sequential(conv_bn(w[3], w[4], 3, 2, act=nn.SiLU), C2f(w[4], w[4]), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4, self.td3 = C2f(w[4] + w[3], w[3]), C2f(w[3] + w[2], w[2])
        self.down3, self.bu4 = conv_bn(w[2], w[2], 3, 2, act=nn.SiLU), C2f(w[2] + w[3], w[3])
        self.down4, self.bu5 = conv_bn(w[3], w[3], 3, 2, act=nn.SiLU), C2f(w[3] + w[4], w[4])
        self.heads = nn.ModuleList(nn.Sequential(conv_bn(c, c, 3, act=nn.SiLU), nn.Conv2d(c, 4 + classes, 1))
                                   for c in (w[2], w[3], w[4]))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return tuple(h(f) for h, f in zip(self.heads, (n3, n4, n5)))


class UNet(nn.Module):
    """U-Net: three encoder levels, a bottleneck, ConvTranspose up-sampling with skip concats."""

    def __init__(self, classes=3, w=(8, 16, 32, 64)):
        super().__init__()
        double = lambda a, b: nn.Sequential(conv_bn(a, b), conv_bn(b, b))  # noqa: E731
        self.enc = nn.ModuleList([double(3, w[0]), double(w[0], w[1]), double(w[1], w[2])])
        self.mid = double(w[2], w[3])
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, 2) for i in (2, 1, 0))
        self.dec = nn.ModuleList(double(2 * w[i], w[i]) for i in (2, 1, 0))
        self.out = nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.mid(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.out(x)


class AudioNet(nn.Module):
    """A 1-D conv net on raw waveforms (M5-style): strided Conv1d front end, Conv1d blocks, pooling."""

    def __init__(self, classes=5, w=(8, 16, 32, 32)):
        super().__init__()
        block = lambda a, b, k, s=1: nn.Sequential(nn.Conv1d(a, b, k, s, k // 2), nn.BatchNorm1d(b), nn.ReLU())  # noqa: E731
        self.features = nn.Sequential(block(1, w[0], 31, 8), nn.MaxPool1d(4), block(w[0], w[1], 3), block(w[1], w[1], 3),
                                      nn.MaxPool1d(4), block(w[1], w[2], 3), block(w[2], w[3], 5, 2))
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(-1))


class DenseNet(nn.Module):
    """DenseNet-style: blocks of BN-ReLU-Conv3x3 layers, each reading the Concat of the block's input and every
    earlier layer's output (growth channels each), joined by 1x1 transitions (average-pooled where `pool`).
    The default is test-sized; bench/dense_blocks.py builds the 150-conv one of issue 13."""

    def __init__(self, blocks=3, layers=3, growth=8, width=16, pool=(0, 1), classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.blocks, self.transitions, self.pool = nn.ModuleList(), nn.ModuleList(), set(pool)
        for b in range(blocks):
            self.blocks.append(nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(width + i * growth), nn.ReLU(),
                              nn.Conv2d(width + i * growth, growth, 3, 1, 1, bias=False)) for i in range(layers)))
            if b < blocks - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(width + layers * growth), nn.ReLU(),
                                                      nn.Conv2d(width + layers * growth, width, 1, bias=False)))
        self.head = nn.Sequential(nn.BatchNorm2d(width + layers * growth), nn.ReLU())
        self.fc = nn.Linear(width + layers * growth, classes)

    def forward(self, x):
        x = self.stem(x)
        for b, block in enumerate(self.blocks):
            feats = [x]
            for layer in block:
                feats.append(layer(torch.cat(feats, 1)))
            x = torch.cat(feats, 1)
            if b < len(self.transitions):
                x = self.transitions[b](x)
                if b in self.pool:
                    x = nn.functional.avg_pool2d(x, 2)
        return self.fc(self.head(x).mean((2, 3)))


@dataclass(frozen=True)
class Arch:
    make: object
    input_shape: tuple[int, ...]  # one sample, batch 1
    dynamic: tuple[int, ...]  # axes of the input exported as dynamic (0: batch)
    outputs: int = 1
    multiple: int = 1  # dynamic spatial sizes are multiples of this


ARCHS = {
    "resnet18": Arch(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), (1, 3, 32, 32), (0,)),
    "resnet50": Arch(lambda: ResNet(Bottleneck, (3, 4, 6, 3)), (1, 3, 32, 32), (0,)),
    "vgg16_bn": Arch(VGG, (1, 3, 32, 32), (0,)),
    "mobilenet_v2": Arch(MobileNetV2, (1, 3, 32, 32), (0,)),
    "yolo": Arch(YoloLite, (1, 3, 64, 64), (0, 2, 3), outputs=3, multiple=32),
    "unet": Arch(UNet, (1, 3, 32, 32), (0, 2, 3), multiple=8),
    "audio1d": Arch(AudioNet, (1, 1, 1024), (0, 2), multiple=256),
    "densenet": Arch(DenseNet, (1, 3, 32, 32), (0, 2, 3), multiple=4),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The architecture in eval mode with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    return seeded(ARCHS[name].make(), seed)


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model in eval mode, its BatchNorm statistics and affine parameters seeded away from identity."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def example_input(name: str, *, batch: int = 1, scale: int = 1, seed: int = 0) -> np.ndarray:
    """A seeded input; batch and (for dynamic spatial axes) the spatial size can differ from export."""
    arch = ARCHS[name]
    shape = list(arch.input_shape)
    shape[0] = batch
    for axis in arch.dynamic:
        if axis > 1:
            shape[axis] *= scale
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- export ----------------------------------------------------------------------------------------

EXPORTERS = ("legacy", "dynamo")
OPSETS = (11, 13, 17, 21)


def output_names(name: str) -> list[str]:
    n = ARCHS[name].outputs
    return ["output"] if n == 1 else [f"output{i}" for i in range(n)]


def export(name: str, exporter: str, opset: int, *, seed: int = 0) -> onnx.ModelProto:
    """The architecture exported by one torch exporter, input 'input', dynamic axes as in ARCHS."""
    return onnx.load_from_string(_export_bytes(name, exporter, opset, seed))


@functools.lru_cache(maxsize=None)
def _export_bytes(name: str, exporter: str, opset: int, seed: int) -> bytes:
    model = build(name, seed)
    x = torch.from_numpy(example_input(name))
    dynamic = ARCHS[name].dynamic
    with _quiet():
        if exporter == "legacy":
            f = io.BytesIO()
            axes = {"input": {a: f"d{a}" for a in dynamic}}
            axes.update({o: {0: "d0"} for o in output_names(name)})
            torch.onnx.export(model, (x,), f, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=output_names(name), dynamic_axes=axes)
            return f.getvalue()
        if exporter == "dynamo":
            return _dynamo_bytes(name, opset, seed)
    raise ValueError(f"unknown exporter {exporter!r}")


def _dynamo_bytes(name: str, opset: int, seed: int) -> bytes:
    """What torch.onnx.export(dynamo=True, opset_version=opset) does, sharing its slow steps between opsets.

    The exporter translates at opset max(opset, 18), converts down to `opset` with onnxscript's
    version converter (falling back to onnx's; on failure it keeps the higher opset), then optimises.
    Here the translation is done once for every opset below 18, then converted and optimised per
    opset with the same two library calls the exporter makes."""
    from onnx_ir import from_proto, to_proto
    from torch.onnx._internal._lazy_import import onnxscript_apis

    base = onnx.load_from_string(_dynamo_translated(name, max(opset, 18), seed))
    model = onnxscript_apis.convert_version(from_proto(base), opset)
    return to_proto(onnxscript_apis.optimize(model)).SerializeToString()


@functools.lru_cache(maxsize=None)
def _dynamo_translated(name: str, opset: int, seed: int) -> bytes:
    _cache_torchlib_registry()
    program = torch.onnx.export(_exported_program(name, seed), dynamo=True, opset_version=opset, optimize=False,
                                input_names=["input"], output_names=output_names(name), verbose=False)
    return program.model_proto.SerializeToString()


@functools.lru_cache(maxsize=None)
def _exported_program(name: str, seed: int):
    """torch.export of the architecture (dynamic axes as Dims), shared by the opsets of one model."""
    arch = ARCHS[name]
    dims = {a: torch.export.Dim(f"d{a}", min=2, max=64) for a in arch.dynamic}
    dims = {a: d * arch.multiple if a > 1 else d for a, d in dims.items()}
    x = torch.from_numpy(example_input(name, batch=2))
    return torch.export.export(build(name, seed), (x,), dynamic_shapes=(dims,), strict=False)


def _cache_torchlib_registry():
    """The dynamo exporter rebuilds its op registry (about 4 s) on every call; build it once (tests only)."""
    from onnxscript import _framework_apis

    for mod in vars(_framework_apis).values():
        fn = getattr(mod, "get_torchlib_ops", None)
        if fn is not None and not hasattr(fn, "cache_info"):
            mod.get_torchlib_ops = functools.lru_cache(maxsize=None)(fn)


@contextlib.contextmanager
def _quiet():
    """The exporters warn and log a lot (deprecations, version conversion fallbacks)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def run_torch(name: str, x: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    with torch.no_grad():
        out = build(name, seed)(torch.from_numpy(x))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
