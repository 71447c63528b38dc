"""Speed and peak memory of the calibrated path: `onnxstack compress --data` beside onnxruntime's
quantize_static on the same images, in the same run.

    python bench/calibrated_speed.py [--models resnet50 resnet18 mobilenetv2 vgg16] [--images 512]
                                     [--sweep 64 128 256 512 1024] [--sweep-model resnet18]

For each zoo model (bench/zoo.py), N images at 224x224 (random crops of scikit-image's sample photos,
scaled to [0, 1] and normalised as torchvision does; the same array for both tools) are written to an
npz, then each tool runs as a process of its own, as a user runs it:
  onnxstack        `python -m onnxstack compress MODEL --data IMAGES.npz -o OUT -q` (default settings)
  quantize_static  onnxruntime.quantization.quantize_static, int8 per-channel QDQ weights, uint8
                   activations, MinMax calibration over the same images (what a user picks first)
Wall time is taken by the parent, CPU time from the child's rusage, peak RSS from the child itself
(VmHWM). Ratios are onnxstack's over quantize_static's, same model, same images, same run. With --sweep,
one model is timed at each number of images, to show how time and memory grow with the data.
Writes bench/results/calibrated_speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress_speed import ONNXSTACK, PEAK, run_measured  # noqa: E402

TOOLS = ("onnxstack", "quantize_static")
TARGET_TIME, TARGET_MEMORY, TARGET_GB, TARGET_IMAGES = 2.0, 1.25, 4.0, 512  # issue 13: ResNet-50

STATIC = PEAK + """
import sys
import numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
src, dst, data = sys.argv[1], sys.argv[2], sys.argv[3]
images = np.load(data)["input"]
name = onnx.load(src, load_external_data=False).graph.input[0].name

class Reader(CalibrationDataReader):
    def __init__(self):
        self.i = 0

    def get_next(self):
        if self.i >= len(images):
            return None
        self.i += 1
        return {name: images[self.i - 1:self.i]}

quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
"""


def images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """n crops of scikit-image's sample photos, ImageNet-normalised, (n, 3, size, size) float32."""
    from real_models import CALIB_PHOTOS, random_crops

    x = random_crops(CALIB_PHOTOS, n, (size, size), seed).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def command(tool: str, model: Path, out: Path, data: Path) -> list[str]:
    if tool == "onnxstack":
        return [sys.executable, "-c", ONNXSTACK, "compress", str(model), "--data", str(data), "-o", str(out),
                "--overwrite", "-q"]
    return [sys.executable, "-c", STATIC, str(model), str(out), str(data)]


def measure(name: str, n: int, tmp: Path) -> dict:
    import zoo

    path = zoo.model_path(name)
    data = tmp / f"images{n}.npz"
    if not data.exists():
        np.savez(data, input=images(n))
    entry = {"images": n, "tools": {}}
    for tool in TOOLS:
        out = tmp / f"{name}.{tool}.onnx"
        run = run_measured(command(tool, path, out, data), tmp / f"{name}.{tool}.log")
        run["output_mb"] = out.stat().st_size / 2**20
        out.unlink()
        entry["tools"][tool] = run
        print(f"  {name} {n} images {tool:16s}: {run['wall_s']:7.1f} s wall, {run['cpu_s']:7.1f} s CPU, "
              f"{run['peak_rss_mb']:7.0f} MiB peak", flush=True)
    ours, theirs = entry["tools"]["onnxstack"], entry["tools"]["quantize_static"]
    entry["ratios"] = {"wall": ours["wall_s"] / theirs["wall_s"], "cpu": ours["cpu_s"] / theirs["cpu_s"],
                       "peak_rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    return entry


def markdown(results: dict, sweep: list, meta: dict) -> str:
    lines = [f"Calibrated compression, each tool a fresh process; {meta['cpus']} CPUs, load average "
             f"{meta['load_before']:.1f} before / {meta['load_after']:.1f} after. Ratios: onnxstack over "
             "quantize_static (int8 per-channel QDQ, MinMax), same images, same run.", "",
             "| model | images | onnxstack s (CPU s) | quantize_static s (CPU s) | time ratio | "
             "peak MiB (onnxstack / static) | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for e in [*results.values(), *sweep]:
        o, s, r = e["tools"]["onnxstack"], e["tools"]["quantize_static"], e["ratios"]
        lines.append(f"| {e['model']} | {e['images']} | {o['wall_s']:.1f} ({o['cpu_s']:.1f}) | {s['wall_s']:.1f} "
                     f"({s['cpu_s']:.1f}) | {r['wall']:.2f}x | {o['peak_rss_mb']:.0f} / {s['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss']:.2f}x |")
    bar = results.get("resnet50")
    if bar and bar["images"] == TARGET_IMAGES:
        r, peak = bar["ratios"], bar["tools"]["onnxstack"]["peak_rss_mb"] / 1024
        lines += ["", f"Issue 13 bar (ResNet-50, {TARGET_IMAGES} images): time at most {TARGET_TIME:g}x quantize_static "
                      f"({'met' if r['wall'] <= TARGET_TIME else 'NOT met'}: {r['wall']:.2f}x); peak memory at most "
                      f"{TARGET_MEMORY:g}x and under {TARGET_GB:g} GB ("
                      f"{'met' if r['peak_rss'] <= TARGET_MEMORY and peak < TARGET_GB else 'NOT met'}: "
                      f"{r['peak_rss']:.2f}x, {peak:.2f} GB)."]
    return "\n".join(lines)


def plot(sweep: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [e["images"] for e in sweep]
    for tool in TOOLS:
        axes[0].plot(xs, [e["tools"][tool]["wall_s"] for e in sweep], "o-", label=tool)
        axes[1].plot(xs, [e["tools"][tool]["peak_rss_mb"] for e in sweep], "o-", label=tool)
    axes[0].set(xlabel="calibration images", ylabel="wall time, s", title=f"{sweep[0]['model']}: time")
    axes[1].set(xlabel="calibration images", ylabel="peak RSS, MiB", title=f"{sweep[0]['model']}: memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    import zoo
    from common import RESULTS, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["resnet50"], choices=zoo.MODELS)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--sweep", nargs="*", type=int, default=[], help="numbers of images for the sweep")
    ap.add_argument("--sweep-model", default="resnet18", choices=zoo.MODELS)
    args = ap.parse_args()
    meta = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "images": args.images}
    results, sweep = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = {"model": name, **measure(name, args.images, Path(tmp))}
        for n in args.sweep:
            sweep.append({"model": args.sweep_model, **measure(args.sweep_model, n, Path(tmp))})
    meta["load_after"] = os.getloadavg()[0]
    md = markdown(results, sweep, meta)
    write_results("calibrated_speed", {**meta, "results": results, "sweep": sweep}, md)
    if len(sweep) > 1:
        plot(sweep, RESULTS / "calibrated_speed.png")
    print(md)


if __name__ == "__main__":
    main()
