"""Accuracy against size on the sample models: onnxstack (without data, calibrated) beside
onnxruntime's per-channel int8 / int4 QDQ quantization and a binary-weight baseline.

    python bench/accuracy.py [--models fashion_cnn mnist_cnn] [--calib 1000]

Writes bench/results/accuracy.{json,md}. Test data: the test files in sample_models/data; calibration:
the first --calib of the training images beside them (labels unused); the tables state both counts. conv_ratio counts every stored
bit of the convolutions (codebooks, indices, scales, biases, layers left dense, QDQ scales/zero points).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxstack
from common import (REPO, RESULTS, SAMPLES, binary_weight_baseline, conv_bits, environment, load_npz, ort_quantized,
                    predict, write_results)
from plots import redraw_accuracy_vs_ratio

# label, CompressConfig arguments, calibrate?, target ratio
ONNXSTACK_RUNS = [
    ("onnxstack defaults (d=16, k=1), no data", {}, False, None),
    ("onnxstack defaults (d=16, k=1), calibrated", {}, True, None),
    ("onnxstack d=8, k=2, calibrated", {"slice_dim": 8, "terms": 2}, True, None),
    ("onnxstack --target-ratio 10, calibrated", {}, True, 10.0),
    ("onnxstack --target-ratio 30, calibrated", {}, True, 30.0),
    ("onnxstack --target-ratio 50, calibrated", {}, True, 50.0),
]


def measure(label, model, logits_ref, labels, base_bits, seconds=None, extra=None):
    logits = predict(model, {"input": TEST["input"]})
    row = {
        "method": label,
        "conv_ratio": base_bits / conv_bits(model),
        "file_kb": model.ByteSize() / 1024,
        "accuracy": float(np.mean(logits.argmax(1) == labels)),
        "agreement": float(np.mean(logits.argmax(1) == logits_ref.argmax(1))),
        "seconds": seconds,
    }
    row.update(extra or {})
    return row


def run_model(name, calib_n, tmp: Path):
    """(rows, counts): one row a method, and the numbers of test and calibration images used."""
    global TEST
    path, test_path, calib_path = SAMPLES[name]
    model = onnx.load(REPO / path)
    TEST, labels = load_npz(test_path)
    calib, _ = load_npz(calib_path)
    calib = {k: v[:calib_n] for k, v in calib.items()}
    base_bits = conv_bits(model)
    ref = predict(model, TEST)
    rows = [measure("fp32 original", model, ref, labels, base_bits)]
    for bits in (8, 4):
        t = time.perf_counter()
        q = ort_quantized(REPO / path, calib, bits, tmp / f"{name}.int{bits}.onnx")
        rows.append(measure(f"onnxruntime int{bits} per-channel QDQ", q, ref, labels, base_bits, time.perf_counter() - t))
    binm, binbits = binary_weight_baseline(model, onnxstack.CompressConfig())
    row = measure("binary weights sign(W)*mean|W|", binm, ref, labels, base_bits)
    row["conv_ratio"] = base_bits / binbits
    rows.append(row)
    for label, kwargs, calibrated, target in ONNXSTACK_RUNS:
        t = time.perf_counter()
        try:
            result = onnxstack.compress(model, onnxstack.CompressConfig(**kwargs),
                                        data=calib if calibrated else None, target_ratio=target)
        except onnxstack.ConfigError as e:  # e.g. a target the small model cannot reach
            print(f"{name}: {label}: {e}")
            continue
        rows.append(measure(label, result.model, ref, labels, base_bits, time.perf_counter() - t,
                            {"report_conv_ratio": result.report["conv_ratio"]}))
    for r in rows:
        r["drop_points"] = 100 * (rows[0]["accuracy"] - r["accuracy"])
    return rows, {"test_images": len(labels), "calibration_images": len(calib["input"])}


def markdown(results, counts) -> str:
    lines = []
    for name, rows in results.items():
        n = counts[name]
        lines += [f"**{name}** ({n['test_images']:,} test images; calibration: {n['calibration_images']:,} training "
                  "images, no labels)", "",
                  "| method | conv ratio | file KB | top-1 % | drop (points) | agreement % | seconds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
            lines.append(f"| {r['method']} | {r['conv_ratio']:.1f}x | {r['file_kb']:.0f} | {100 * r['accuracy']:.2f} | "
                         f"{r['drop_points']:.2f} | {100 * r['agreement']:.2f} | {secs} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    ap.add_argument("--calib", type=int, default=1000, help="calibration images")
    args = ap.parse_args()
    results, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name], counts[name] = run_model(name, args.calib, Path(tmp))
            print(markdown({name: results[name]}, counts), flush=True)
    md = markdown(results, counts)
    write_results("accuracy", {"environment": environment(), "images": counts, "results": results}, md)
    redraw_accuracy_vs_ratio(RESULTS)  # from this script's results and the other's
    print(md)


if __name__ == "__main__":
    main()
