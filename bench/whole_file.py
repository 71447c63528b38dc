"""The whole file (issue 14): at the defaults, how much the file shrinks beside the convs, and what is left
float; with data and a target of 20x, the Fashion sample's top-1 on held-out test images.

    python bench/whole_file.py [--models fashion_cnn mnist_cnn resnet18 resnet50 mobilenetv2 efficientnet_lite0
                                 ddddocr_ocr ddddocr_det hed] [--test 2000]

For each model, `onnxstack.compress` at the defaults (no data): the file ratio (the report's headline:
bytes of the written model against the original's), the conv ratio (the weights the tool can touch), the
largest float weight a Gemm or MatMul still reads (the bar: none over 64 KB) and the largest float
initializer any standard op still reads (with that op). ResNet-18/50, MobileNetV2 and VGG-16 are bench/zoo.py's
exports (seeded weights, the shapes of the real ones); the real pretrained models come from
bench/real_models.py. Session memory of the default form is in bench/results/inference_speed.md.
Writes bench/results/whole_file.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxstack  # noqa: E402
from common import REPO, SAMPLES, bench_model, load_npz, write_results  # noqa: E402

LIMIT = 64 * 1024  # bytes: the bar for a float Gemm / MatMul weight left


def float_left(model: onnx.ModelProto) -> tuple[dict | None, dict | None]:
    """(the largest float weight a Gemm/MatMul reads, the largest float initializer a standard op reads):
    each {"bytes", "op", "name"} or None."""
    inits = {t.name: t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                             onnx.TensorProto.FLOAT16)}
    readers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, node.op_type)

    def entry(name):
        return {"bytes": int(numpy_helper.to_array(inits[name]).nbytes), "op": readers.get(name, "-"), "name": name}

    gemm = [n for n, op in readers.items() if op in ("Gemm", "MatMul")]
    largest_gemm = max((entry(n) for n in gemm), key=lambda e: e["bytes"], default=None)
    largest = max((entry(n) for n, op in readers.items() if op != "StackedBinaryConv"), key=lambda e: e["bytes"],
                  default=None)  # the format's own scales are counted in the conv ratio
    return largest_gemm, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fashion_cnn", "mnist_cnn", "resnet18", "resnet50", "mobilenetv2",
                                                    "vgg16", "efficientnet_lite0", "ddddocr_ocr", "ddddocr_det", "hed"])
    ap.add_argument("--test", type=int, default=2000, help="Fashion test images of the target-20 row")
    args = ap.parse_args()
    logging.getLogger("onnxstack").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = bench_model(name, Path(tmp))
            t = time.perf_counter()
            result = onnxstack.compress(model)
            seconds = time.perf_counter() - t
            gemm, largest = float_left(result.model)
            rest = onnxstack.compress(model, onnxstack.CompressConfig(rest="int8")).report
            rows.append({"model": name, "file_ratio": result.report["file_ratio"],
                         "conv_ratio": result.report["conv_ratio"], "original_bytes": result.report["original_bytes"],
                         "compressed_bytes": result.report["compressed_bytes"], "gemm_left": gemm,
                         "largest_float_left": largest, "seconds": seconds, "file_ratio_rest_int8": rest["file_ratio"],
                         "rest_int8_stored": len(rest["rest"].get("touched", []))})
            print(rows[-1], flush=True)
    accuracy = fashion_target(args.test)
    print(accuracy, flush=True)
    write_results("whole_file", {"rows": rows, "fashion_target_20": accuracy, "limit_bytes": LIMIT},
                  render(rows, accuracy))


def fashion_target(n_test: int, target: float = 20.0) -> dict:
    """Fashion sample, --data (its calibration images) --target-ratio 20: top-1 on test images."""
    model_path, test_path, calib_path = SAMPLES["fashion_cnn"]
    model = onnx.load(REPO / model_path)
    inp = model.graph.input[0].name
    test, labels = load_npz(test_path)
    calib, _ = load_npz(calib_path)
    x, y = test["input"][:n_test], labels[:n_test]
    t = time.perf_counter()
    result = onnxstack.compress(model, data={inp: calib["input"]}, target_ratio=target)
    seconds = time.perf_counter() - t
    top1 = lambda m: float((onnxstack.open_session(m).run(None, {inp: x})[0].argmax(1) == y).mean())  # noqa: E731
    fp32, got = top1(model), top1(result.model)
    return {"target": target, "test_images": int(len(x)), "fp32_top1": fp32, "top1": got,
            "drop_points": 100 * (fp32 - got), "conv_ratio": result.report["conv_ratio"],
            "file_ratio": result.report["file_ratio"], "seconds": seconds}


def render(rows: list[dict], acc: dict) -> str:
    kb = lambda b: f"{b / 1024:,.0f}"  # noqa: E731

    def left(e):
        return "none" if e is None else f"{kb(e['bytes'])} KB ({e['op']})"

    lines = ["At the defaults (no data): the file ratio (the report's headline: the written model's bytes against the "
             "original's), the conv ratio (every Conv and lifted Gemm/MatMul weight and bias), the largest float "
             "weight a Gemm or MatMul still reads (the bar: none over "
             f"{LIMIT // 1024} KB), and the largest float initializer a standard op still reads (and that op; the "
             "scales of onnxstack's own op are in the conv ratio and not listed).", "",
             "'--rest int8': the file ratio when what is left float is stored int8 per channel (and how many tensors "
             "that stores).", "",
             "| model | original KB | compressed KB | file ratio | conv ratio | largest float Gemm/MatMul weight left "
             "| largest float initializer of a standard op | file ratio, --rest int8 | compress s |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {kb(r['original_bytes'])} | {kb(r['compressed_bytes'])} | "
                     f"{r['file_ratio']:.1f}x | {r['conv_ratio']:.1f}x | {left(r['gemm_left'])} | "
                     f"{left(r['largest_float_left'])} | {r['file_ratio_rest_int8']:.1f}x ({r['rest_int8_stored']}) | "
                     f"{r['seconds']:.0f} |")
    over = [r["model"] for r in rows if r["gemm_left"] and r["gemm_left"]["bytes"] > LIMIT]
    lines += ["", "Float Gemm/MatMul weights over the limit: " + (", ".join(over) if over else "none") + ".",
              f"Fashion sample with its calibration images and a target of {acc['target']:g}x: conv ratio "
              f"{acc['conv_ratio']:.1f}x, file ratio {acc['file_ratio']:.1f}x, top-1 {100 * acc['top1']:.2f} % on "
              f"{acc['test_images']} test images against the fp32 model's {100 * acc['fp32_top1']:.2f} % "
              f"(drop {acc['drop_points']:.2f} points; {acc['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
