"""The README's example run: `onnxstack compress` at default settings on the Fashion-MNIST sample,
and the same with calibration data. Writes bench/results/compress_example.{json,md}.

    python bench/compress_example.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, environment, write_results

COMMANDS = [
    ["compress", "sample_models/fashion_cnn.onnx"],
    ["compress", "sample_models/fashion_cnn.onnx", "--data", "sample_models/data/fashion_calib.npz"],
]


def main() -> None:
    blocks, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, args in enumerate(COMMANDS):
            out, rep = Path(tmp) / f"out{i}.onnx", Path(tmp) / f"r{i}.json"
            cmd = [sys.executable, "-m", "onnxstack", *args, "-o", str(out), "--report", str(rep)]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            table = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("wrote "))
            shown = "onnxstack " + " ".join(args) + " -o fashion.stacked.onnx"
            blocks.append(f"```\n$ {shown}\n{table}\n```")
            report = json.loads(rep.read_text())
            runs.append({"command": shown, "conv_ratio": report["conv_ratio"], "file_ratio": report["file_ratio"],
                         "layers": report["layers"]})
    write_results("compress_example", {"environment": environment(), "runs": runs}, "\n\n".join(blocks))
    print("\n\n".join(blocks))


if __name__ == "__main__":
    main()
