"""Where the dense form's extra session memory goes: onnxruntime's constant folding, measured op by op.

    python bench/fold_memory.py [--layers 16] [--channels 512] [--repeats 5]

One model, a stack of `--layers` 3x3 Convs of `--channels` in and out (float weights 4*L*C*C*9 bytes), in
five forms whose Conv weights are the same size:
  - original:           float initializers;
  - one folded op:      each weight a Gather of 3x3 codeword planes by a stored int32 row index (N, C):
                        one weight-sized tensor for onnxruntime to fold, and no scales (the floor of any
                        decode that onnxruntime folds);
  - two folded ops:     that Gather times a stored per-channel scale (N, C, 1, 1): two weight-sized tensors
                        (what a per-slice scale costs at the least);
  - onnxstack dense:    the original compressed at defaults with `execution="dense"` (the default form's
                        body: Gather of codeword rows, the scaled sum of the terms, the 4-D reshape);
  - onnxstack lean:     the same with `execution="lean"` (decoded at every run, nothing folded).
Each is measured `--repeats` times as onnxstack.runtime.session_memory does (a session created with
default options and run once, in a fresh process); the table gives the median and the range, since a
single figure of the same model moves by up to a third between processes here.

Writes bench/results/fold_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402

import onnxstack  # noqa: E402
from onnxstack.runtime import session_memory  # noqa: E402

D, M = 16, 64  # slice depth and codewords of the synthetic folded forms (onnxstack's defaults for these layers)


def stack(layers: int, channels: int, form: str, seed: int = 0) -> onnx.ModelProto:
    """The Conv stack with its weights stored as `form` ("original", "one folded op", "two folded ops")."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, n, c, s = "X", channels, channels, channels // D

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr, name))
        return name

    for i in range(layers):
        p = f"l{i}_"
        if form == "original":
            w = init(p + "w", (rng.standard_normal((n, c, 3, 3)) * 0.02).astype(np.float32))
        else:
            planes = init(p + "planes", np.sign(rng.standard_normal((M * D, 3, 3))).astype(np.float32))
            idx = rng.integers(0, M, (n, s, 1))
            rows = init(p + "rows", (idx * D + np.arange(D)).reshape(n, c).astype(np.int32))
            w = p + "gathered"
            nodes.append(helper.make_node("Gather", [planes, rows], [w], axis=0))
            if form == "two folded ops":
                scale = init(p + "scale", np.repeat(rng.random((n, s)) * 0.02, D, axis=1)
                             .reshape(n, c, 1, 1).astype(np.float32))
                nodes.append(helper.make_node("Mul", [w, scale], [p + "w"]))
                w = p + "w"
        y = f"y{i}"
        nodes.append(helper.make_node("Conv", [x, w], [y], pads=[1, 1, 1, 1]))
        x = y
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def markdown(data: dict) -> str:
    a = data["args"]
    mb = data["weight_bytes"] / 1e6
    lines = [f"Session memory (MB; created with default options and run once, a fresh process each, median of "
             f"{a['repeats']} and range) of a stack of {a['layers']} 3x3 Convs of {a['channels']} channels "
             f"({mb:.0f} MB of float weights), in onnxruntime {data['environment'].get('onnxruntime', '?')}. "
             "'Folded' counts the weight-sized tensors onnxruntime computes from stored tensors at session start.",
             "", "| form | file MB | session MB (median) | range | ratio to the original |", "|---|---:|---:|---|---:|"]
    base = data["rows"][0]["median_mb"]
    for r in data["rows"]:
        lines.append(f"| {r['form']} | {r['file_mb']:.1f} | {r['median_mb']:.0f} | {min(r['mb']):.0f}-{max(r['mb']):.0f}"
                     f" | {r['median_mb'] / base:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.channels % D:
        sys.exit(f"fold_memory: --channels must be a multiple of {D}")
    feeds = {"X": np.zeros((1, args.channels, 8, 8), np.float32)}
    original = stack(args.layers, args.channels, "original")
    models = {f: stack(args.layers, args.channels, f) for f in ("original", "one folded op", "two folded ops")}
    for form in ("dense", "lean"):
        models[f"onnxstack {form}"] = onnxstack.compress(original, onnxstack.CompressConfig(execution=form)).model
    rows = []
    with tempfile.TemporaryDirectory(prefix="fold-memory-") as tmp:
        for form, model in models.items():
            path = os.path.join(tmp, "model.onnx")
            onnx.save(model, path)
            mb = [session_memory(path, feeds) / 1e6 for _ in range(args.repeats)]
            rows.append({"form": form, "file_mb": os.path.getsize(path) / 1e6, "mb": mb,
                         "median_mb": float(np.median(mb))})
            print(f"{form}: {rows[-1]['median_mb']:.0f} MB (range {min(mb):.0f}-{max(mb):.0f})", flush=True)
    data = {"args": vars(args), "environment": environment(),
            "weight_bytes": 4 * args.layers * args.channels ** 2 * 9, "rows": rows}
    write_results("fold_memory", data, markdown(data))


if __name__ == "__main__":
    main()
