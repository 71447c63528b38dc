"""Does the settings search pick well? Its choice beside the same target with the model's largest layer
fixed to int4 (a per-layer override), same calibration data, same held-out data.

    python bench/allocation_probe.py [--model ddddocr_ocr] [--target 8]

The search minimises the sum of per-layer damages (each layer's output error times its measured
sensitivity) under the bit budget. Where the largest layer holds most of the bits, that sum decides
between "the largest layer binary, the rest near float" and "the largest layer int4, some convs binary";
this probe measures both end to end. Writes bench/results/allocation_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_models as rm  # noqa: E402
from common import write_results  # noqa: E402

import onnxstack  # noqa: E402
from onnxstack.analyse import analyse  # noqa: E402
from onnxstack.config import LayerOverride  # noqa: E402
from onnxstack.normalise import normalise  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ddddocr_ocr", choices=list(rm.tasks()))
    ap.add_argument("--target", type=float, default=8.0)
    args = ap.parse_args()
    task = rm.tasks()[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        original = onnx.load(task.build(Path(tmp) / "model.onnx"))
    calib, evals = task.calib(False), task.evals(False)
    ref = {k: rm.predict(original, x, task.batch, task.out_axis) for k, (x, _) in evals.items()}
    infos = [i for i in analyse(normalise(onnx.ModelProto.FromString(original.SerializeToString())),
                                onnxstack.CompressConfig()) if i.eligible]
    largest = max(infos, key=lambda i: int(np.prod(i.shape)))
    rows = []
    for label, overrides in (("search's choice", {}),
                             (f"{largest.name} fixed to int4", {largest.name: LayerOverride(representation="int4")})):
        t = time.perf_counter()
        r = onnxstack.compress(original, onnxstack.CompressConfig(overrides=overrides),
                               data={task.input_name: calib}, target_ratio=args.target)
        seconds = time.perf_counter() - t
        row = {"settings": label, "conv_ratio": r.report["conv_ratio"], "seconds": seconds,
               "representations": dict(collections.Counter(a["representation"] for a in r.report["allocation"].values())),
               "largest_layer": r.report["allocation"][largest.name],
               "summed_damage": float(sum(a["damage"] for a in r.report["allocation"].values()))}
        for k, (x, labels) in evals.items():
            row.update(task.score(k, ref[k], rm.predict(r.model, x, task.batch, task.out_axis), labels))
        rows.append(row)
        print(row, flush=True)
    primary = next(h for k, h, _ in task.metrics if k == task.primary)
    lines = [f"{task.title}: target {args.target:g}x, calibrated; the largest layer is {largest.name} "
             f"({int(np.prod(largest.shape)):,} of {sum(int(np.prod(i.shape)) for i in infos):,} weights).", "",
             f"| settings | conv ratio | {primary} | summed damage (what the search minimises) | layers by representation | compress s |",
             "|---|---:|---:|---:|---|---:|"]
    for row in rows:
        reps = ", ".join(f"{k} {v}" for k, v in sorted(row["representations"].items()))
        lines.append(f"| {row['settings']} | {row['conv_ratio']:.2f}x | {100 * row[task.primary]:.1f} | "
                     f"{row['summed_damage']:.4f} | {reps} | {row['seconds']:.0f} |")
    write_results("allocation_probe", {"model": args.model, "target": args.target, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
