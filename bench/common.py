"""Shared pieces of the benchmark scripts: sample data, ORT baselines, honest conv bit counts."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import onnxstack
from onnxstack.api import open_session

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SAMPLES = {
    "fashion_cnn": ("sample_models/fashion_cnn.onnx", "sample_models/data/fashion_test.npz",
                    "sample_models/data/fashion_calib.npz"),
    "mnist_cnn": ("sample_models/mnist_cnn.onnx", "sample_models/data/mnist_test.npz",
                  "sample_models/data/mnist_calib.npz"),
}


def bench_model(name: str, tmp: Path) -> onnx.ModelProto:
    """A model of the benches by name: a sample (SAMPLES), a bench/zoo.py export, or a real pretrained
    model of bench/real_models.py (built into `tmp`)."""
    if name in SAMPLES:
        return onnx.load(REPO / SAMPLES[name][0])
    import zoo

    if name in zoo.MODELS:
        return onnx.load(zoo.model_path(name))
    import real_models as rm

    return onnx.load(rm.tasks()[name].build(tmp / f"{name}.onnx"))


def load_npz(path):
    with np.load(REPO / path) as z:
        return {"input": z["input"].astype(np.float32)}, z["labels"].astype(np.int64)


def predict(model, feeds, batch=500, threads=2):
    sess = open_session(model, threads=threads)
    name = sess.get_inputs()[0].name
    x = feeds[name]
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def bits_of(tensor: onnx.TensorProto) -> int:
    """Stored bits of an initializer (4-bit types counted as 4 bits an element)."""
    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    width = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if width is None:
        width = 8 * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return n * width


def conv_bits(model: onnx.ModelProto) -> int:
    """Bits of everything stored for the weight layers onnxstack can compress: the initializers that feed
    each Conv's, Gemm's and MatMul's weight and bias (a MatMul's or Gemm's only where its weight is a stored
    tensor), directly or through DequantizeLinear; com.onnxstack nodes count all stored inputs. Fully
    connected layers count because onnxstack lifts them to 1x1 convs: counting only Conv nodes, a model whose
    FC was compressed showed a ratio below 1."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    seen, total = set(), 0

    def count(name):
        nonlocal total
        if name in seen or not name:
            return
        seen.add(name)
        if name in inits:
            total += bits_of(inits[name])
        elif name in producers and producers[name].op_type == "DequantizeLinear":
            for i in producers[name].input:
                count(i)

    def stored(name):  # a stored tensor, or one dequantized from a stored tensor (not a quantized activation)
        p = producers.get(name)
        return name in inits or (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits)

    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type == "Conv":
            for name in node.input[1:]:
                count(name)
        elif node.domain in ("", "ai.onnx") and node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 \
                and stored(node.input[1]) and not stored(node.input[0]):
            for name in node.input[1:]:
                count(name)
        elif node.domain == onnxstack.op.DOMAIN:
            for name in node.input[1:]:
                count(name)
    return total


def ort_quantized(model_path: Path, calib: dict, weight_bits: int, out: Path, batch: int = 50) -> onnx.ModelProto:
    """onnxruntime's own static QDQ quantization of the Convs and the fully connected layers (Gemm, MatMul:
    the layers onnxstack compresses too), per-channel weights of 8 or 4 bits.
    Activations are quantized to 16 bits so the baseline is about the weights. calib: one array, the model's
    single input, keyed by its name."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    (name, x), = calib.items()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self.it, None)

    model = onnx.load(model_path)
    if model.opset_import[0].version < 21:  # int4 and 16-bit QDQ need opset 21
        model = onnx.version_converter.convert_version(model, 21)
    src = out.with_suffix(".opset21.onnx")
    onnx.save(model, src)
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
                    activation_type=QuantType.QUInt16, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                    extra_options={"WeightSymmetric": True})
    return onnx.load(out)


def binary_weight_baseline(model: onnx.ModelProto, config: onnxstack.CompressConfig):
    """sign(W) * mean|W| per filter on the layers onnxstack compresses (32x on those weights).
    Returns (model with the binarised float weights, conv bits as stored in 1-bit form)."""
    from onnxstack.analyse import analyse
    from onnxstack.normalise import normalise

    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = normalise(out)  # fully connected layers lifted to 1x1 Convs, as onnxstack compresses them
    inits = {t.name: t for t in out.graph.initializer}
    total = conv_bits(model)
    for info in analyse(out, config):
        if not info.eligible:
            continue
        w = numpy_helper.to_array(inits[info.weight_name])
        alpha = np.abs(w).mean(axis=(1, 2, 3), keepdims=True)
        inits[info.weight_name].CopyFrom(numpy_helper.from_array((np.sign(w) * alpha).astype(np.float32),
                                                                 info.weight_name))
        total -= 32 * w.size - (w.size + 32 * w.shape[0])
    return out, total


def environment() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "date": time.strftime("%Y-%m-%d")}


def git_state(repo: Path = REPO) -> dict:
    """The commit the working tree is at (`git rev-parse HEAD`) and whether tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


START_STATE = git_state()  # the code a bench runs is the code it imported: stamped with the state at its start


def measured_line(state: dict) -> str:
    """'Measured at commit <12 hex>[ (with uncommitted changes)], <date>.': the line every results .md ends with."""
    dirty = " (with uncommitted changes)" if state.get("dirty") else ""
    return f"Measured at commit {state['commit'][:12]}{dirty}, {state['date']}."


def write_results(name: str, data: dict, markdown: str, stamp: bool = True, results: Path | None = None,
                  state: dict | None = None) -> dict:
    """Write bench/results/NAME.json and NAME.md. With stamp (the default) the json gets `measured_at`
    (commit and dirty as when the bench started, date, the script's command line) and the .md ends with `measured_line`; a script whose
    results merge runs made at different commits (real_models.py) records one per run itself and passes
    stamp=False; `state` re-uses a run's stamp (re-rendering its results). Returns what was written to the json."""
    import sys

    results = RESULTS if results is None else results
    results.mkdir(parents=True, exist_ok=True)
    if stamp:
        script = Path(sys.argv[0]).resolve()
        script = script.relative_to(REPO) if script.is_relative_to(REPO) else script.name
        state = state or {**START_STATE, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", str(script),
                                                                                        *sys.argv[1:]])}
        data = {"measured_at": state, **data}
        markdown = markdown.rstrip() + "\n\n" + measured_line(state)
    (results / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown + "\n")
    return data
