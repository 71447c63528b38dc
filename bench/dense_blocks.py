"""Calibrating a stack of dense blocks (issue 13): about 150 3x3 convs, each reading a Concat, 32-160 channels.

    python bench/dense_blocks.py [--images 128] [--size 64] [--blocks 17] [--layers 8]

The model is tests/real_models.DenseNet (random weights, BatchNorm seeded by real_models.seeded) at
`--blocks` blocks of `--layers` BN-ReLU-Conv3x3 layers of growth 16 on a 32-channel block input (so each
conv reads 32-144 channels and each block ends at 160), joined by 1x1 transitions back to 32 channels,
average-pooled after blocks 4, 8 and 12; exported by torch's legacy exporter at opset 17. It is
compressed at default settings with `--images` calibration images of `--size` x `--size` (Gaussian noise:
the time depends on the shapes, not the values), in this process; the wall time, CPU time and the
process's peak resident memory are recorded, beside onnxruntime's quantize_static (per-channel QDQ,
MinMax) on the same images in the same run. Issue 13's bar (BAR_SECONDS) is read at the defaults of --images and --size.

Writes bench/results/dense_blocks.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, write_results  # noqa: E402

import onnxstack  # noqa: E402
from onnxstack.runtime import vm_bytes  # noqa: E402

BAR_SECONDS = 300


def peak_mib() -> float:  # this process's peak resident memory
    return vm_bytes() / 2 ** 20


def build(blocks: int, layers: int) -> onnx.ModelProto:
    import torch

    from tests import real_models

    torch.manual_seed(0)
    net = real_models.seeded(real_models.DenseNet(blocks=blocks, layers=layers, growth=16, width=32, pool=(3, 7, 11)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dense.onnx")
        torch.onnx.export(net, torch.zeros(1, 3, 64, 64), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
        return onnx.load(path)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def quantize_static(model: onnx.ModelProto, images: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static as qs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        qs(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
           activation_type=QuantType.QInt8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=17)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    model = build(args.blocks, args.layers)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    images = np.random.default_rng(0).standard_normal((args.images, 3, args.size, args.size)).astype(np.float32)
    print(f"{convs} convs; compressing with {args.images} images of {args.size}x{args.size}", flush=True)
    base_mib = peak_mib()
    result, wall, cpu = timed(lambda: onnxstack.compress(model, data={"input": images}, reconstruct=False))
    ours = {"wall_s": wall, "cpu_s": cpu, "peak_mib": peak_mib(), "layers_compressed": result.report["layers_compressed"],
            "conv_ratio": result.report["conv_ratio"]}
    print(f"onnxstack: {wall:.0f} s wall, {cpu:.0f} s CPU, peak {ours['peak_mib']:.0f} MiB", flush=True)
    _, wall, cpu = timed(lambda: quantize_static(model, images))
    theirs = {"wall_s": wall, "cpu_s": cpu}
    print(f"quantize_static: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    data = {"args": vars(args), "environment": {**environment(), "cpus": os.cpu_count()}, "convs": convs,
            "peak_mib_before": base_mib, "onnxstack": ours, "quantize_static": theirs,
            "bar_seconds": BAR_SECONDS, "bar_met": ours["wall_s"] < BAR_SECONDS}
    md = "\n".join([
        f"Calibrating a stack of dense blocks (tests/real_models.DenseNet, {args.blocks} blocks of {args.layers} "
        f"3x3 convs, {convs} convs in all, 32-160 channels) with {args.images} images of {args.size}x{args.size}, "
        f"default settings, {os.cpu_count()} CPUs, in one process (peak resident memory of the process; "
        "quantize_static ran after onnxstack, so its peak is not separable and is not shown).", "",
        "| tool | wall s | CPU s | peak MiB | layers compressed | conv ratio |", "|---|---:|---:|---:|---:|---:|",
        f"| onnxstack --data | {ours['wall_s']:.0f} | {ours['cpu_s']:.0f} | {ours['peak_mib']:.0f} | "
        f"{ours['layers_compressed']} | {ours['conv_ratio']:.1f}x |",
        f"| onnxruntime quantize_static (per-channel QDQ, MinMax) | {theirs['wall_s']:.0f} | {theirs['cpu_s']:.0f} | | | |",
        "", f"Issue 13's bar: under {BAR_SECONDS} s: {'met' if data['bar_met'] else 'not met'} "
            f"({ours['wall_s'] / theirs['wall_s']:.1f}x quantize_static's time)."])
    write_results("dense_blocks", data, md)
    print(md)


if __name__ == "__main__":
    main()
