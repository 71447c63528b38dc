"""Block reconstruction ablation on the sample models: what each piece buys, and what it costs.

    python bench/reconstruct.py [--models fashion_cnn mnist_cnn] [--ratios 16 32 64] [--threads 1]

For each model and target ratio: compress with the calibrated path (the first COMPRESS_CALIB calibration
images, `--target-ratio R`), then reconstruct the same compressed model with each variant below (the whole
calibration file, ReconstructConfig's seed), and score every file in onnxruntime on the test images: top-1
and agreement with the original's top-1. Variants (the last three each add one thing to "+ scales and biases"):
  closed-form only | + latent codebooks (the defaults) | + scales and biases |
  + index re-assignment every 100 steps | + QDrop mixing 0.5 | scales and biases, whole chain as one block

Writes bench/results/reconstruct.{json,md} with the git commit and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads yield on a shared machine

import numpy as np  # noqa: E402

import onnxstack  # noqa: E402
from common import REPO, SAMPLES, environment, load_npz, predict, write_results  # noqa: E402
from onnxstack.torch_bridge.reconstruct import ReconstructConfig, reconstruct  # noqa: E402

COMPRESS_CALIB = 1000  # calibration images the closed-form fit sees

ALL = dict(train_scales=True, train_bias=True)
VARIANTS = [  # explicit settings, independent of ReconstructConfig's defaults
    ("closed-form only", None),
    ("+ latent codebooks", dict(train_scales=False, train_bias=False)),
    ("+ scales and biases", dict(ALL)),
    ("+ index re-assignment /100 steps", dict(ALL, reassign_every=100)),
    ("+ QDrop mixing 0.5", dict(ALL, qdrop=0.5)),
    ("latent + scales + biases, chain as one block", dict(ALL, group=99)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SAMPLES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[16, 32, 64])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    load_start = os.getloadavg()
    rows, images = [], {}
    for name in args.models:
        model_path, test_path, calib_path = SAMPLES[name]
        calib, _ = load_npz(calib_path)
        test, labels = load_npz(test_path)
        ref = predict(REPO / model_path, test, threads=args.threads).argmax(1)
        images[name] = {"test": len(labels), "calibration_compress": len(calib["input"][:COMPRESS_CALIB]),
                        "calibration_reconstruct": len(calib["input"])}
        for ratio in args.ratios:
            t = time.monotonic()
            result = onnxstack.compress(REPO / model_path, data={"input": calib["input"][:COMPRESS_CALIB]}, target_ratio=ratio)
            compress_s = time.monotonic() - t
            for label, overrides in VARIANTS:
                row = dict(model=name, target_ratio=ratio, conv_ratio=result.report["conv_ratio"], variant=label,
                           compress_seconds=round(compress_s, 1))
                model, seconds, report = result.model, 0.0, None
                if overrides is not None:
                    config = ReconstructConfig(threads=args.threads, **overrides)
                    t = time.monotonic()
                    model, report = reconstruct(REPO / model_path, result.model, {"input": calib["input"]}, config)
                    seconds = time.monotonic() - t
                    row["config"] = overrides
                    row["blocks"] = [{k: b[k] for k in ("block", "steps", "loss_before", "loss_trained", "kept",
                                                        "reassigned", "seconds")} for b in report["blocks"]]
                pred = predict(model, test, threads=args.threads).argmax(1)
                row.update(top1=round(100 * float(np.mean(pred == labels)), 2),
                           agreement=round(100 * float(np.mean(pred == ref)), 2), seconds=round(seconds, 1))
                rows.append(row)
                print(f"{name} {ratio:g}x {label:34s} top-1 {row['top1']:6.2f} agreement {row['agreement']:6.2f} "
                      f"{seconds:6.1f} s", flush=True)
    data = {"threads": args.threads, "cpus": os.cpu_count(), "seed": ReconstructConfig().seed, "images": images, "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "environment": environment(), "rows": rows,
            "defaults": ReconstructConfig().to_dict()}
    write_results("reconstruct", data, markdown(data))


def markdown(data: dict) -> str:
    images = "; ".join(f"{m}: {n['test']:,} test images, calibration {n['calibration_compress']:,} for the fit and "
                       f"{n['calibration_reconstruct']:,} for reconstruction" for m, n in data["images"].items())
    lines = [f"Block reconstruction after the calibrated closed-form fit; {images}; seed {data['seed']}, "
             f"{data['threads']} torch thread(s) on a shared {data['cpus']}-core machine (load average "
             f"{data['load_average_start'][0]:.1f} at the start, {data['load_average_end'][0]:.1f} at the end). "
             "Block loss: ||f(x) - t||^2 / ||t||^2 on the calibration images, summed over blocks.", "",
             "| model | target | conv ratio | variant | top-1 % | agreement % | block loss before -> after | "
             "reconstruct s |", "|---|---:|---:|---|---:|---:|---|---:|"]
    for r in data["rows"]:
        loss = ""
        if r.get("blocks"):
            before = sum(b["loss_before"] for b in r["blocks"])
            after = sum(b["loss_trained"] if b["kept"] else b["loss_before"] for b in r["blocks"])
            loss = f"{before:.3f} -> {after:.3f}"
        lines.append(f"| {r['model']} | {r['target_ratio']:g}x | {r['conv_ratio']:.1f}x | {r['variant']} | "
                     f"{r['top1']:.2f} | {r['agreement']:.2f} | {loss} | {r['seconds'] if r.get('blocks') else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
