"""How the calibrated path does with few calibration images: the sample models with 32, 128 and 1,000 of
their calibration images, at the defaults and at targets 16 and 32, scored on the first --test test images.

    python bench/small_data.py [--counts 32 128 1000] [--targets 0 16 32] [--test 2000]

Real users often have a few dozen images; the output-aware fit then sees fewer rows than weights in many
layers (the data check warns), and how the ridge treats the directions the data leave unseen decides how
well the model answers other inputs. Writes bench/results/small_data.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxstack  # noqa: E402
from common import REPO, SAMPLES, load_npz, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", nargs="+", type=int, default=[32, 128, 1000])
    ap.add_argument("--targets", nargs="+", type=float, default=[0, 16, 32], help="0: the defaults (no target)")
    ap.add_argument("--test", type=int, default=2000)
    args = ap.parse_args()
    logging.getLogger("onnxstack").setLevel(logging.ERROR)  # the data check's warnings are expected here
    rows = []
    for name, (model_path, test_path, calib_path) in SAMPLES.items():
        model = onnx.load(REPO / model_path)
        inp = model.graph.input[0].name
        test, labels = load_npz(test_path)
        calib, _ = load_npz(calib_path)
        x, y = test["input"][:args.test], labels[:args.test]
        ref = onnxstack.open_session(model).run(None, {inp: x})[0].argmax(1)
        for n in args.counts:
            for target in args.targets:
                t = time.perf_counter()
                result = onnxstack.compress(model, data={inp: calib["input"][:n]}, target_ratio=target or None)
                seconds = time.perf_counter() - t
                pred = onnxstack.open_session(result.model).run(None, {inp: x})[0].argmax(1)
                rows.append({"model": name, "calibration_images": n, "target": target or None,
                             "conv_ratio": result.report["conv_ratio"], "agreement": float((pred == ref).mean()),
                             "top1": float((pred == y).mean()), "fp32_top1": float((ref == y).mean()),
                             "seconds": seconds})
                print(rows[-1], flush=True)
    lines = [f"Calibrated compression with few calibration images; {args.test} test images each; top-1 agreement "
             "with the fp32 model and top-1 against the labels.", "",
             "| model | calibration images | target | conv ratio | agreement % | top-1 % (fp32) | compress s |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        target = "defaults" if r["target"] is None else f"{r['target']:g}x"
        lines.append(f"| {r['model']} | {r['calibration_images']} | {target} | {r['conv_ratio']:.1f}x | "
                     f"{100 * r['agreement']:.2f} | {100 * r['top1']:.2f} ({100 * r['fp32_top1']:.2f}) | "
                     f"{r['seconds']:.0f} |")
    write_results("small_data", {"rows": rows, "test_images": args.test}, "\n".join(lines))


if __name__ == "__main__":
    main()
