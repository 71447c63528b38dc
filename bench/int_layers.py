"""Integer layers on the fashion sample: all convs int4 / int8 with data (GPTQ-style) and without (round to
nearest), at opset 21 (an upgraded copy) and 17 (int4 falls back to int8), and int first/last layers around
binary ones. Per-conv output error on the sample's test images (accumulated, against the original), top-1.

    python bench/int_layers.py     # a few minutes; writes bench/results/int_layers.{json,md}
"""
import json, time
import numpy as np, onnx
from onnx import version_converter, helper
import onnxstack
from onnxstack.config import CompressConfig, LayerOverride
import onnxruntime as ort
from common import REPO, SAMPLES, environment, write_results

MODEL, TEST, CALIB = SAMPLES["fashion_cnn"]
base = onnx.load(REPO / MODEL)
m21 = version_converter.convert_version(base, 21)
m21.ir_version = 10
onnx.checker.check_model(m21, full_check=True)
calib = np.load(REPO / CALIB)["input"]
test = np.load(REPO / TEST)
xt, yt = test["input"], test["labels"]
convs = ["conv1", "conv2", "conv3", "conv4"]

def with_outputs(model):
    m = onnx.ModelProto(); m.CopyFrom(model)
    for c in convs:
        m.graph.output.append(helper.make_tensor_value_info(c, onnx.TensorProto.FLOAT, None))
    return m

def run(model, x):
    s = ort.InferenceSession(with_outputs(model).SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [s.run(None, {"input": x[i:i+500]}) for i in range(0, len(x), 500)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]

ref = run(m21, xt)
def score(model):
    got = run(model, xt)
    top1 = float(np.mean(got[0].argmax(1) == yt))
    errs = {c: float(np.sum((g - r) ** 2) / np.sum((r - r.mean(axis=(0, 2, 3), keepdims=True)) ** 2)) for c, g, r in zip(convs, got[1:], ref[1:])}
    return top1, errs

original_top1 = float(np.mean(ref[0].argmax(1) == yt))
print("original top-1", original_top1)
rows = []
def case(name, model, overrides, data, **kw):
    cfg = CompressConfig(overrides={c: LayerOverride(**v) for c, v in overrides.items()}, **kw)
    t = time.time()
    r = onnxstack.compress(model, cfg, data={"input": calib} if data else None)
    secs = time.time() - t
    top1, errs = score(r.model)
    reps = {e["name"]: e.get("representation", "float") for e in r.report["layers"]}
    row = dict(case=name, data=data, top1=round(100 * top1, 2), conv_ratio=round(r.report["conv_ratio"], 2),
               file_kb=round(r.report["compressed_bytes"] / 1024, 1), seconds=round(secs, 1),
               reps=reps, out_err={c: round(v, 5) for c, v in errs.items()},
               fallback={e["name"]: e["fallback"] for e in r.report["layers"] if "fallback" in e})
    rows.append(row); print(json.dumps(row))

all4 = {c: dict(representation="int4") for c in convs}
all8 = {c: dict(representation="int8") for c in convs}
for data in (False, True):
    case("all int4 (opset 21)", m21, all4, data)
    case("all int8 (opset 21)", m21, all8, data)
case("all int4 at opset 17 -> int8", base, all4, True)
for data in (False, True):
    case("binary default, conv1 dense", m21, {}, data)
    case("conv1 int8 + binary middle + conv4 int8", m21, {"conv1": dict(representation="int8"), "conv4": dict(representation="int8")}, data)
    case("conv1 int4 + binary middle + conv4 int4", m21, {"conv1": dict(representation="int4"), "conv4": dict(representation="int4")}, data)


def markdown(rows):
    lines = [f"Integer layers on fashion_cnn: {len(yt):,} test images, {len(calib):,} calibration images; original "
             f"top-1 {100 * original_top1:.2f}%. Output error: per-conv relative squared error against the original.",
             "", "| case | data | top-1 % | conv ratio | file KB | seconds | output error " + " / ".join(convs) + " |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {'yes' if r['data'] else 'no'} | {r['top1']:.2f} | {r['conv_ratio']:.2f}x | "
                     f"{r['file_kb']:.1f} | {r['seconds']:.1f} | "
                     + " / ".join(f"{r['out_err'][c]:.4f}" for c in convs) + " |")
    return "\n".join(lines)


write_results("int_layers", {"environment": environment(), "test_images": len(yt), "calibration_images": len(calib),
                             "original_top1": original_top1, "results": rows}, markdown(rows))
