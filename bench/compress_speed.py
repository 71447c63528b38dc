"""Compression speed and peak memory: `onnxstack compress` beside onnxruntime's own quantizers.

    python bench/compress_speed.py [--models resnet18 resnet50 vgg16 mobilenetv2] [--repeats 3] [--calib 4]

For each zoo model (bench/zoo.py, built and cached on first use), three tools run at their default
settings, each as a process of its own, as a user runs them (interpreter start and imports included):
  onnxstack         `python -m onnxstack compress MODEL -o OUT -q`  (no data, default d and m)
  quantize_dynamic  onnxruntime.quantization.quantize_dynamic, int8 weights
  quantize_static   onnxruntime.quantization.quantize_static, per-channel int4 QDQ weights (16-bit
                    activations, Convs only, as bench/accuracy.py), `--calib` random inputs; the model
                    is first converted to opset 21, which int4 needs (counted: a user must do it too)
The tools take turns, `--repeats` times per model (the first tool rotates), so load from other
processes falls on all of them alike. Wall time is taken by the parent; CPU time (user + system) from the
process's rusage (os.wait4), peak RSS from the process itself at exit (/proc/self/status VmHWM,
and the peak of any children it waited for). Medians are reported; the time ratios are onnxstack's median over each quantizer's, from the
same run on the same model. Writes bench/results/compress_speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnxstack.runtime import VM_STATUS  # noqa: E402  the one memory reader, run by each measured child

TOOLS = ("onnxstack", "quantize_dynamic", "quantize_static")

# Each tool runs after this prologue, which reports the process's peak RSS from /proc/self/status
# (VmHWM; the parent's rusage would also count the parent's own size, inherited through fork/exec).
PEAK = VM_STATUS + """
import atexit, resource, sys
def _peak():
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sys.stderr.write(f"\\nPEAK_KB {vm_bytes() // 1024} {children}\\n")
atexit.register(_peak)
"""

ONNXSTACK = PEAK + """
import runpy, sys
sys.argv = ["onnxstack", *sys.argv[1:]]
runpy.run_module("onnxstack", run_name="__main__", alter_sys=True)
"""

DYNAMIC = PEAK + """
import json, sys, time
t0 = time.perf_counter()
from onnxruntime.quantization import QuantType, quantize_dynamic
t1 = time.perf_counter()
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
print(json.dumps({"import_s": t1 - t0, "quantize_s": time.perf_counter() - t1}))
"""

STATIC = PEAK + """
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np, onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
t1 = time.perf_counter()
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = onnx.load(src)
x = model.graph.input[0]
shape = [d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim]
tmp = dst + ".opset21.onnx"
onnx.save(version_converter.convert_version(model, 21), tmp)  # int4 QDQ needs opset 21
del model
t2 = time.perf_counter()
rng = np.random.default_rng(0)

class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter([{x.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)])

    def get_next(self):
        return next(self.it, None)

quantize_static(tmp, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt4, activation_type=QuantType.QUInt16,
                op_types_to_quantize=["Conv"], extra_options={"WeightSymmetric": True})
os.remove(tmp)
print(json.dumps({"import_s": t1 - t0, "convert_s": t2 - t1, "quantize_s": time.perf_counter() - t2}))
"""


def command(tool: str, model: Path, out: Path, calib: int) -> list[str]:
    if tool == "onnxstack":
        return [sys.executable, "-c", ONNXSTACK, "compress", str(model), "-o", str(out), "--overwrite", "-q"]
    if tool == "quantize_dynamic":
        return [sys.executable, "-c", DYNAMIC, str(model), str(out)]
    return [sys.executable, "-c", STATIC, str(model), str(out), str(calib)]


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run cmd to completion: wall seconds, CPU seconds (its rusage) and peak RSS (MiB, as it reports)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{text[-2000:]}")
    phases, peak_kb = {}, None
    for line in text.splitlines()[::-1]:
        if line.startswith("{") and not phases:
            phases = json.loads(line)
        elif line.startswith("PEAK_KB ") and peak_kb is None:
            peak_kb = max(int(v) for v in line.split()[1:])
    if peak_kb is None:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... did not report its peak memory:\n{text[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "user_s": usage.ru_utime,
            "system_s": usage.ru_stime, "peak_rss_mb": peak_kb / 1024, "phases": phases}


def run_model(name: str, repeats: int, calib: int, tmp: Path) -> dict:
    import onnx
    import zoo

    path = zoo.model_path(name)
    model = onnx.load(str(path), load_external_data=False)
    entry = {"model_mb": path.stat().st_size / 2**20,
             "params_m": sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6,
             "conv_gmacs": sum(zoo.conv_macs(model).values()) / 1e9, "tools": {t: {"runs": []} for t in TOOLS}}
    del model
    for r in range(repeats):
        order = TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)]
        for tool in order:
            out = tmp / f"{name}.{tool}.onnx"
            run = run_measured(command(tool, path, out, calib), tmp / f"{name}.{tool}.log")
            run["output_mb"] = out.stat().st_size / 2**20
            entry["tools"][tool]["runs"].append(run)
            print(f"  {name} {tool:16s} run {r + 1}/{repeats}: {run['wall_s']:6.2f} s wall, {run['cpu_s']:6.2f} s CPU, "
                  f"{run['peak_rss_mb']:7.0f} MiB peak", flush=True)
            if tool == "onnxstack":
                entry["conv_ratio"] = _conv_ratio(out)
            out.unlink()
    for tool, t in entry["tools"].items():
        runs = t["runs"]
        for key in ("wall_s", "cpu_s"):
            values = [x[key] for x in runs]
            t[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values)}
        t["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
        t["output_mb"] = runs[-1]["output_mb"]
    ours = entry["tools"]["onnxstack"]
    entry["ratios"] = {f"{key}_vs_{tool}": ours[key]["median"] / entry["tools"][tool][key]["median"]
                       for tool in TOOLS[1:] for key in ("wall_s", "cpu_s")}
    return entry


def _conv_ratio(path: Path) -> float | None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta.get("onnxstack.report", "{}")).get("conv_ratio")


TARGET_TIME_RATIO, TARGET_RSS_GB = 2.0, 1.5  # the ResNet-50 target: time over quantize_dynamic, peak RSS


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Wall time, median of {meta['repeats']} runs (min-max), each tool a fresh process at default settings; "
        f"{meta['environment'].get('cpus')} CPUs, load average {meta['load_before'][0]:.1f} before / "
        f"{meta['load_after'][0]:.1f} after. Ratio: onnxstack's median time over the quantizer's, same run.", "",
        "| model | onnxstack s | int8 dynamic s | int4 static s | ratio vs dynamic | ratio vs static | "
        "CPU s (ours / dyn / static) | CPU ratio vs dynamic |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda t: f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})"  # noqa: E731
    for name, e in results.items():
        tl, r = e["tools"], e["ratios"]
        lines.append(f"| {name} | {fmt(tl['onnxstack']['wall_s'])} | {fmt(tl['quantize_dynamic']['wall_s'])} | "
                     f"{fmt(tl['quantize_static']['wall_s'])} | {r['wall_s_vs_quantize_dynamic']:.2f}x | "
                     f"{r['wall_s_vs_quantize_static']:.2f}x | "
                     f"{' / '.join(format(tl[t]['cpu_s']['median'], '.1f') for t in TOOLS)} | "
                     f"{r['cpu_s_vs_quantize_dynamic']:.2f}x |")
    lines += ["", "| model | fp32 MB | peak RSS MiB (onnxstack / dyn / static) | output MB (onnxstack / dyn / static) | "
              "onnxstack conv ratio |", "|---|---:|---:|---:|---:|"]
    for name, e in results.items():
        tl = e["tools"]
        ratio = f"{e['conv_ratio']:.1f}x" if e.get("conv_ratio") else "-"
        lines.append(f"| {name} | {e['model_mb']:.1f} | {' / '.join(format(tl[t]['peak_rss_mb'], '.0f') for t in TOOLS)} | "
                     f"{' / '.join(format(tl[t]['output_mb'], '.1f') for t in TOOLS)} | {ratio} |")
    if "resnet50" in results:
        e = results["resnet50"]
        ok_time = e["ratios"]["wall_s_vs_quantize_dynamic"] <= TARGET_TIME_RATIO
        ok_mem = e["tools"]["onnxstack"]["peak_rss_mb"] < TARGET_RSS_GB * 1024
        lines += ["", f"ResNet-50 target (time at most {TARGET_TIME_RATIO:g}x quantize_dynamic, peak RSS under "
                      f"{TARGET_RSS_GB:g} GB): "
                      f"time {'met' if ok_time else 'NOT met'}, memory {'met' if ok_mem else 'NOT met'}."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from plots import grouped_bars

    names = list(results)
    labels = {"onnxstack": "onnxstack compress", "quantize_dynamic": "ORT quantize_dynamic (int8)",
              "quantize_static": "ORT quantize_static (int4 QDQ)"}
    grouped_bars(path, names, {labels[t]: [results[n]["tools"][t]["wall_s"]["median"] for n in names] for t in TOOLS},
                 "wall time, s (log)", "Compression time, default settings (median, min-max)",
                 errors={labels[t]: [(results[n]["tools"][t]["wall_s"]["min"], results[n]["tools"][t]["wall_s"]["max"])
                                     for n in names] for t in TOOLS}, log=True)
    grouped_bars(path.with_name(path.stem + "_memory.png"), names,
                 {labels[t]: [results[n]["tools"][t]["peak_rss_mb"] for n in names] for t in TOOLS},
                 "peak RSS, MiB (log)", "Peak memory of the compressing process", log=True)


def main():
    import zoo
    from common import RESULTS, environment, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=zoo.MODELS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib", type=int, default=4, help="random calibration inputs for quantize_static")
    args = ap.parse_args()
    env = environment()
    env["cpus"] = os.cpu_count()
    env["threads_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    meta = {"repeats": args.repeats, "calib": args.calib, "environment": env, "load_before": os.getloadavg()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = run_model(name, args.repeats, args.calib, Path(tmp))
    meta["load_after"] = os.getloadavg()
    md = markdown(results, meta)
    write_results("compress_speed", {**meta, "results": results}, md)
    plot(results, RESULTS / "compress_speed.png")
    print(md)


if __name__ == "__main__":
    main()
