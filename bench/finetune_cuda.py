"""`onnxstack finetune --device cuda` against `--device cpu`: same compressed model, settings and seed.

    python bench/finetune_cuda.py [--epochs 4] [--threads 4]     # needs torch with CUDA and a GPU

Compresses the MNIST sample at --target-ratio 100 with its calibration file, fine-tunes the result on
each device with the commands below, and scores both files with `onnxstack evaluate` on the test file.
Writes bench/results/finetune_cuda.{json,md}: the commands, the device and versions, the fine-tuning
wall time and the evaluate results of each device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, SAMPLES, environment, write_results

DEVICES = ("cuda", "cpu")


def onnxstack_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onnxstack", *args], cwd=REPO, check=True, capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=100.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads of both runs")
    ap.add_argument("--labels-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("finetune_cuda.py: torch sees no CUDA device")
    model, test, calib = SAMPLES["mnist_cnn"]
    commands, seconds, evaluated = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        compressed = str(Path(tmp) / "compressed.onnx")
        step = ["compress", model, "--data", calib, "--target-ratio", f"{args.ratio:g}", "-o", compressed, "-q"]
        onnxstack_cli(*step)
        commands.append("onnxstack " + " ".join(step))
        for device in DEVICES:
            tuned, report = str(Path(tmp) / f"ft_{device}.onnx"), Path(tmp) / f"eval_{device}.json"
            step = ["finetune", compressed, "--teacher", model, "--data", calib, "--epochs", str(args.epochs),
                    "--labels-weight", f"{args.labels_weight:g}", "--device", device, "--threads", str(args.threads),
                    "--seed", str(args.seed), "-o", tuned, "-q"]
            t = time.perf_counter()
            onnxstack_cli(*step)
            seconds[device] = time.perf_counter() - t
            commands.append("onnxstack " + " ".join(step))
            step = ["evaluate", model, tuned, "--data", test, "--json", str(report), "--latency-runs", "0", "-q"]
            onnxstack_cli(*step)
            commands.append("onnxstack " + " ".join(step))
            ev = json.loads(report.read_text())
            evaluated[device] = {k: ev[k] for k in ("accuracy_original", "accuracy_compressed", "top1_agreement",
                                                    "conv_ratio") if k in ev}
    env = {**environment(), "torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0)}
    lines = [f"`onnxstack finetune` on {env['cuda_device']} (torch {env['torch']}) against the CPU, "
             f"mnist_cnn at --target-ratio {args.ratio:g}, {args.epochs} epochs, seed {args.seed}.", "",
             "| device | fine-tune s | top-1 % | top-1 agreement % | conv ratio |", "|---|---:|---:|---:|---:|"]
    for device in DEVICES:
        e = evaluated[device]
        lines.append(f"| {device} | {seconds[device]:.1f} | {100 * e['accuracy_compressed']:.2f} | "
                     f"{100 * e['top1_agreement']:.2f} | {e['conv_ratio']:.1f}x |")
    write_results("finetune_cuda", {"environment": env, "args": vars(args), "commands": commands,
                                    "finetune_seconds": seconds, "evaluate": evaluated}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
