"""Inference speed in onnxruntime: the original model beside the compressed one in each execution form.

    python bench/inference_speed.py [--models resnet18 resnet50 vgg16 mobilenetv2 fashion_cnn mnist_cnn]
                                    [--threads 1 2] [--batches 1 8] [--runs 7] [--no-layers]

Whole models: each model is compressed at default settings (no data) four times, with execution
"auto" (the cost model's choice per layer, the default), "dense", "lean" and "stacked" (every layer
that can be); the fit is deterministic, so the four differ only in how the layers run. For each thread
count and batch size the five sessions take turns, one run each a round (the order rotates), for
at least `--runs` rounds and `--min-seconds` of each; the median latency is reported, and each
variant's ratio to the original as the median over rounds of its time over the original's in the
same round (robust to load from other processes that drifts during the run). The MACs the cost model predicts (core/cost.py, per layer,
times output pixels; other layers' MACs added alike) are reported beside, as ratios to the original.
Memory: what a session of each variant takes, created with default options and run once at batch 1,
in a fresh process (onnxstack.runtime.session_memory, the figure `onnxstack evaluate` reports).

Layers (the cost-model check): every distinct eligible Conv geometry of the models, and a sweep
of codebook sizes m over a few typical geometries, run as one-Conv models in the dense and stacked
forms (LAYER_THREADS, LAYER_BATCH): the measured speed-up of stacked over dense against the predicted MAC
ratio, and whether stacked is faster wherever the cost model picks it.

Writes bench/results/inference_speed.{json,md}, inference_speed.png (latency ratios) and
inference_speed_layers.png (predicted against measured).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from common import REPO, RESULTS, SAMPLES, environment, write_results  # noqa: E402

import onnxstack  # noqa: E402
from onnxstack.analyse import analyse, layer_name  # noqa: E402
from onnxstack.api import open_session  # noqa: E402
from onnxstack.core import cost  # noqa: E402
from onnxstack.runtime import session_memory  # noqa: E402

FORMS = {"default": "auto", "speed": "speed", "dense": "dense", "lean": "lean", "stacked": "stacked"}
MEMORY_REPEATS = 3  # session memory of one model moves by several % between processes: the median of 3
VARIANTS = ("original", *FORMS)
SWEEP_GEOMETRIES = [  # (N, C, k, stride, H): typical ResNet / VGG layers
    (64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7), (512, 512, 3, 1, 14),
    (256, 1024, 1, 1, 14),
]
SWEEP_M = (8, 16, 32, 64, 128, 256)
LAYER_THREADS, LAYER_BATCH = 1, 1  # the cost-model check's one-Conv runs
PLOT_THREADS, PLOT_BATCH = 1, 1  # the whole-model latencies drawn in inference_speed.png
MARGIN = inspect.signature(cost.choose_form).parameters["margin"].default  # the cost model's "stacked" threshold


def model_path(name: str) -> Path | None:
    if name in zoo.MODELS:
        return zoo.model_path(name)
    path = REPO / SAMPLES[name][0]
    return path if path.is_file() else None


# ---------------------------------------------------------------- predicted MACs

def layer_geometry(model: onnx.ModelProto) -> dict[str, dict]:
    """Conv layer name -> input and output shape at batch 1 (shape inference), and Gemm MACs under ''."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {"": {"other_macs": 0}}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Conv":
            out[layer_name(node, i)] = {"input": shapes[node.input[0]], "output": shapes[node.output[0]],
                                        "weight": inits.get(node.input[1])}
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in inits:
            out[""]["other_macs"] += int(np.prod(inits[node.input[1]]))
    return out


def predicted_macs(geometry: dict, report: dict | None) -> int:
    """MACs at batch 1 of the original (report None) or of a compressed model with this report."""
    entries = {e["name"]: e for e in report["layers"]} if report else {}
    total = geometry[""]["other_macs"]
    for name, g in geometry.items():
        if not name:
            continue
        n, cg, kh, kw = g["weight"]
        pixels = g["output"][2] * g["output"][3]
        e = entries.get(name)
        if e is None or "execution" not in e:
            total += pixels * n * cg * kh * kw
        else:
            total += cost.layer_macs(e["execution"], n, cg, kh, kw, e["slices"], e["slice_dim"], e["codebook_size"],
                                     pixels)
    return total


# ---------------------------------------------------------------- timing

def time_sessions(sessions: dict, feeds: dict, runs: int, min_seconds: float) -> dict[str, list[float]]:
    """Latencies (s) of each session: round-robin, one run each a round, rotating the order."""
    names = list(sessions)
    for name in names:  # warm-up
        for _ in range(2):
            sessions[name].run(None, feeds)
    times = {n: [] for n in names}
    r = 0
    while r < runs or min(sum(t) for t in times.values()) < min_seconds:
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - start)
        r += 1
        if r >= 200:
            break
    return times


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of time / base time in the same round (robust to load that drifts)."""
    return float(np.median(np.array(times) / np.array(base)))


def summary(times: list[float]) -> dict:
    return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
            "q25_ms": 1e3 * float(np.percentile(times, 25)), "q75_ms": 1e3 * float(np.percentile(times, 75)),
            "runs": len(times)}


def random_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    return onnxstack.api.random_inputs(model, batch=batch, seed=0)


def optimized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by (domain) op type of the graph onnxruntime runs after its optimisations (1 thread).
    Where the default compressed model's counts equal the original's, every layer runs as the original
    Conv on a weight decoded at session start: the same kernels, so the same speed up to noise."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return dict(sorted(Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node).items()))


DECODE_OPS = ("BitShift", "Gather", "MatMul", "If", "OneHot", "ReduceSum")


def decode_ops_left(ops: dict[str, int]) -> int:
    """Nodes of the StackedBinaryConv decode in an optimised graph (conv nets have none of their own)."""
    return sum(v for k, v in ops.items() if k.split(":")[-1] in DECODE_OPS)


def bench_model(name: str, args) -> dict | None:
    path = model_path(name)
    if path is None:
        print(f"{name}: {SAMPLES[name][0]} not found (scripts/train_samples.py makes it); skipped", flush=True)
        return None
    original = onnx.load(str(path))
    geometry = layer_geometry(original)
    variants = {"original": original}
    entry = {"path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name, "forms": {}}
    base_macs = predicted_macs(geometry, None)
    entry["predicted_macs"] = {"original": base_macs}
    for label, execution in FORMS.items():
        start = time.perf_counter()
        result = onnxstack.compress(original, onnxstack.CompressConfig(execution=execution))
        variants[label] = result.model
        layers = [e for e in result.report["layers"] if "execution" in e]
        entry["forms"][label] = {"compress_s": time.perf_counter() - start,
                                 "layers_stacked": sum(e["execution"] == "stacked" for e in layers),
                                 "layers_dense": sum(e["execution"] == "dense" for e in layers),
                                 "layers_lean": sum(e["execution"] == "lean" for e in layers),
                                 "layers_skipped": len(result.report["layers"]) - len(layers),
                                 "conv_ratio": result.report["conv_ratio"]}
        entry["predicted_macs"][label] = predicted_macs(geometry, result.report)
    entry["predicted_mac_ratio"] = {k: v / base_macs for k, v in entry["predicted_macs"].items()}
    entry["optimized_ops"] = {label: optimized_ops(variants[label]) for label in ("original", "default")}
    entry["default_decode_ops_left"] = decode_ops_left(entry["optimized_ops"]["default"])
    one = random_feeds(original, 1)
    entry["memory_samples"] = {label: [session_memory(model, one) for _ in range(MEMORY_REPEATS)]
                               for label, model in variants.items()}
    entry["memory_bytes"] = {label: int(np.median(v)) if all(v) else None for label, v in entry["memory_samples"].items()}
    print(f"  {name} session memory: " + ", ".join(f"{label} {v / 2**20:.0f} MB" for label, v in
                                                    entry["memory_bytes"].items() if v), flush=True)
    entry["latency"] = {}
    budget = 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the sessions live side by side
    held, entry["not_timed"] = 0, {}
    for label in list(variants):
        need = entry["memory_bytes"].get(label) or 0
        if label != "original" and held + need > budget:
            entry["not_timed"][label] = f"its session takes {need / 2**20:.0f} MB beside the others' {held / 2**20:.0f}"
            del variants[label]
            print(f"  {name} {label}: not timed ({entry['not_timed'][label]})", flush=True)
        else:
            held += need
    for threads in args.threads:
        sessions, session_s = {}, {}
        for label, model in variants.items():
            start = time.perf_counter()
            sessions[label] = open_session(model, threads=threads)
            session_s[label] = time.perf_counter() - start
        for batch in args.batches:
            feeds = random_feeds(original, batch)
            outputs = {label: s.run(None, feeds)[0] for label, s in sessions.items()}
            times = time_sessions(sessions, feeds, args.runs, args.min_seconds)
            stats = {label: summary(t) for label, t in times.items()}
            base = stats["original"]["median_ms"]
            scale = float(np.abs(outputs["original"]).max()) or 1.0
            key = f"threads{threads}_batch{batch}"
            entry["latency"][key] = {
                "threads": threads, "batch": batch, "stats": stats, "session_s": session_s,
                "ratio": {label: paired_ratio(t, times["original"]) for label, t in times.items()},
                "ratio_of_medians": {label: s["median_ms"] / base for label, s in stats.items()},
                "times_ms": {label: [round(1e3 * x, 3) for x in t] for label, t in times.items()},
                **{f"dense_vs_{f}_max_abs_diff": float(np.abs(outputs["dense"] - outputs[f]).max()) / scale
                   for f in ("stacked", "lean") if f in outputs},
            }
            print(f"  {name} {key}: " + ", ".join(f"{label} {s['median_ms']:.1f} ms "
                                                   f"({entry['latency'][key]['ratio'][label]:.2f}x)"
                                                   for label, s in stats.items()), flush=True)
        del sessions
    return entry


# ---------------------------------------------------------------- per-layer cost-model check

def single_conv(n_out: int, cin: int, k: int, stride: int, hw: int, group: int = 1, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))).astype(np.float32)
    b = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
    node = helper.make_node("Conv", ["input", "w", "b"], ["y"], name="conv", kernel_shape=[k, k],
                            strides=[stride, stride], pads=[k // 2] * 4, group=group)
    out = (hw + 2 * (k // 2) - k) // stride + 1
    graph = helper.make_graph([node], "one_conv",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out, out, out])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def bench_layer(n_out, cin, k, stride, hw, m, runs, min_seconds) -> dict:
    model = single_conv(n_out, cin, k, stride, hw)
    forms, entry = {}, None
    for form in ("dense", "stacked"):
        result = onnxstack.compress(model, onnxstack.CompressConfig(codebook_size=m, execution=form))
        forms[form] = open_session(result.model, threads=LAYER_THREADS)
        entry = result.report["layers"][0]
    feeds = {"input": np.random.default_rng(0).standard_normal((LAYER_BATCH, cin, hw, hw)).astype(np.float32)}
    times = time_sessions(forms, feeds, runs, min_seconds)
    dense_ms, stacked_ms = (1e3 * float(np.median(times[f])) for f in ("dense", "stacked"))
    speedup = paired_ratio(times["dense"], times["stacked"])
    args = (n_out, cin, k, k, entry["slices"], entry["slice_dim"], entry["codebook_size"])
    pixels = (-(-hw // stride)) ** 2
    dense_macs, stacked_macs = cost.layer_macs("dense", *args, pixels), cost.layer_macs("stacked", *args, pixels)
    return {"geometry": f"{n_out}x{cin}x{k}x{k} s{stride} @{hw}", "N": n_out, "C": cin, "k": k, "stride": stride,
            "hw": hw, "d": entry["slice_dim"], "m": entry["codebook_size"], "dense_ms": dense_ms,
            "stacked_ms": stacked_ms, "measured_speedup": speedup,
            "predicted_speedup": dense_macs / stacked_macs,
            "cost_model_picks": cost.choose_form(*args[:4], entry["slices"], entry["slice_dim"],
                                                 entry["codebook_size"], 1, pixels=pixels)}


def model_geometries(names: list[str]) -> list[tuple]:
    """Distinct (N, C, k, stride, H) of the eligible group=1 square Convs of these models."""
    seen = {}
    for name in names:
        path = model_path(name)
        if path is None:
            continue
        model = onnx.load(str(path))
        geometry = layer_geometry(model)
        for info in analyse(model, onnxstack.CompressConfig()):
            if not info.eligible or info.group != 1:
                continue
            n, cg, kh, kw = info.shape
            strides = info.attrs.get("strides", [1, 1])
            g = geometry[info.name]
            if kh != kw or g["input"][2] != g["input"][3]:
                continue
            key = (n, cg, kh, int(strides[0]), g["input"][2])
            seen.setdefault(key, []).append(name)
    return [(*k, v) for k, v in seen.items()]


def bench_layers(names: list[str], args) -> dict:
    rows = []
    for n, c, k, stride, hw, used_by in model_geometries(names):
        row = bench_layer(n, c, k, stride, hw, None, args.layer_runs, 0.3)
        row["used_by"] = sorted(set(used_by))
        rows.append(row)
        print(f"  layer {row['geometry']} m={row['m']}: predicted {row['predicted_speedup']:.2f}x, "
              f"measured {row['measured_speedup']:.2f}x ({row['cost_model_picks']})", flush=True)
    sweep = []
    for n, c, k, stride, hw in SWEEP_GEOMETRIES:
        for m in SWEEP_M:
            row = bench_layer(n, c, k, stride, hw, m, args.layer_runs, 0.3)
            sweep.append(row)
            print(f"  sweep {row['geometry']} m={m}: predicted {row['predicted_speedup']:.2f}x, "
                  f"measured {row['measured_speedup']:.2f}x ({row['cost_model_picks']})", flush=True)
    return {"model_layers": rows, "sweep": sweep}


# ---------------------------------------------------------------- report

def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown(results: dict, layers: dict | None, meta: dict) -> str:
    lines = [f"Latency in onnxruntime {meta['environment']['onnxruntime']} (CPU): the original's median, and each "
             f"variant's ratio to it (median over rounds of the two times in the same round); "
             f"{meta['environment']['cpus']} CPUs, load average "
             f"{meta['load_before'][0]:.1f} before / {meta['load_after'][0]:.1f} after. Default settings (d={onnxstack.CompressConfig().slice_dim}, "
             "automatic m, no data); 'default' (execution auto) runs each layer in the faster form by the cost model, "
             "then lean for the layers with the fewest output pixels until the predicted session memory is at most "
             "the original's; 'speed' is the faster form alone. Predicted: MAC "
             "ratio to the original by the cost model. 'Decode left': nodes of the decode (BitShift, Gather, MatMul "
             "of the terms, If) in onnxruntime's optimised graph of the default model; 0 means every dense layer's "
             "weight was constant-folded at session start, so the layers run the original's Conv kernels (lifted "
             "fully connected layers run as 1x1 Convs).", "",
             "| model | threads | batch | original ms | " + " | ".join(FORMS) + " | predicted default / stacked | "
             "layers stacked / lean by default | decode left |",
             "|---|---:|---:|---:|" + "---:|" * len(FORMS) + "---:|---:|---|"]
    for name, e in results.items():
        p = e["predicted_mac_ratio"]
        for key, lat in e["latency"].items():
            r = lat["ratio"]
            forms = e["forms"]["default"]
            lines.append(f"| {name} | {lat['threads']} | {lat['batch']} | {_ms(lat['stats']['original']['median_ms'])} | "
                         + " | ".join(f"{r[f]:.2f}x" if f in r else "not timed" if f in e.get("not_timed", {})
                                      else "-" for f in FORMS) + " | "
                         f"{p['default']:.2f}x / {p['stacked']:.2f}x | "
                         f"{forms['layers_stacked']} / {forms.get('layers_lean', 0)} of "
                         f"{forms['layers_stacked'] + forms['layers_dense'] + forms.get('layers_lean', 0)} | "
                         f"{decode_ops_left(e['optimized_ops']['default'])} |")
    earlier = {}
    for name, e in results.items():
        if e.get("measured_at"):
            earlier.setdefault(str(e["measured_at"])[:12], []).append(name)
    for commit, names in earlier.items():
        lines += ["", f"Rows of {', '.join(names)}: measured at commit {commit}, an earlier run (before the 'speed' "
                      "form, when 'default' was the faster form alone), kept by --merge."]
    lines += ["", "Session memory (MB: a session created with default options and run once at batch 1, in a fresh "
              "process, the median of " + str(MEMORY_REPEATS) + "; peak resident memory over the process's after importing "
              "onnxruntime) and its ratio to the original's. 'dense' folds the decode into float weights at session start (the original's speed); "
              "'lean' decodes at every run and never holds a float weight (see the latency table for its cost).", "",
              "| model | original MB | " + " | ".join(FORMS) + " |", "|---|---:|" + "---:|" * len(FORMS)]
    for name, e in results.items():
        mem = e.get("memory_bytes") or {}
        base = mem.get("original")
        if not base:
            continue
        cells = [f"{mem[f] / 2**20:.0f} ({mem[f] / base:.2f}x)" if mem.get(f) else "-" for f in FORMS]
        lines.append(f"| {name} | {base / 2**20:.0f} | " + " | ".join(cells) + " |")
    if layers:
        all_rows = layers["model_layers"] + layers["sweep"]
        picked = [r for r in all_rows if r["cost_model_picks"] == "stacked"]
        wrong = [r for r in picked if r["measured_speedup"] <= 1.0]
        missed = [r for r in all_rows if r["cost_model_picks"] == "dense" and r["measured_speedup"] > MARGIN]
        errors = [r["measured_speedup"] / r["predicted_speedup"] for r in all_rows]
        lines += ["", f"Cost-model check on one-Conv models ({LAYER_THREADS} thread(s), batch {LAYER_BATCH}, d="
                  f"{onnxstack.CompressConfig().slice_dim}): the speed-up of the stacked form "
                  f"over the dense one, predicted (MAC ratio, with the cost model's fixed "
                  f"{cost.STACKED_OVERHEAD_MACS:,} MACs a stacked call) against measured (latency ratio), on the "
                  f"{len(layers['model_layers'])} distinct layer shapes of these models at their default m, and on "
                  f"m in {list(SWEEP_M)} for {len(SWEEP_GEOMETRIES)} typical shapes ({len(all_rows)} points; "
                  f"measured / predicted: median {np.median(errors):.2f}, range {min(errors):.2f}-{max(errors):.2f}). "
                  f"The cost model picks stacked (predicted speed-up over {MARGIN:g}) for {len(picked)} points; stacked is "
                  f"faster in {len(picked) - len(wrong)} of them. Dense is picked but stacked is more than {MARGIN:g}x "
                  f"faster at {len(missed)} points."
                  + (f" (Measured at {layers['measured_at']}, an earlier run than the tables above.)"
                     if layers.get("measured_at") else ""), ""]
        shown = [r for r in all_rows if r["cost_model_picks"] == "stacked" or r in missed
                 or r in layers["model_layers"] and r["measured_speedup"] > 0.8]
        if shown:
            lines += ["| layer (N x C x k x k, stride, input size) | m | predicted | measured | cost model picks |",
                      "|---|---:|---:|---:|---|"]
            for r in sorted(shown, key=lambda r: r["predicted_speedup"]):
                flag = " (slower)" if r in wrong else ""
                lines.append(f"| {r['geometry']} | {r['m']} | {r['predicted_speedup']:.2f}x | "
                             f"{r['measured_speedup']:.2f}x{flag} | {r['cost_model_picks']} |")
    return "\n".join(lines)


def merged(results: dict) -> dict:
    """The models run now, and the previous run's others, each of those marked with the commit it was measured at."""
    import json

    path = RESULTS / "inference_speed.json"
    if not path.is_file():
        return results
    old = json.loads(path.read_text())
    commit = (old.get("measured_at") or {}).get("commit") or "an unstamped earlier run"
    out = {}
    for name, entry in old.get("results", {}).items():
        out[name] = results.get(name) or {**entry, "measured_at": entry.get("measured_at", commit)}
    return {**out, **{k: v for k, v in results.items() if k not in out}}


def previous_layers() -> dict | None:
    """The cost-model check of the last run that made one (it times one-Conv models in the dense and stacked
    forms only), marked with that run's commit."""
    import json

    path = RESULTS / "inference_speed.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    layers = old.get("layers")
    if layers:
        layers.setdefault("measured_at", (old.get("measured_at") or {}).get("commit") or "an unstamped earlier run")
    return layers


def plot(results: dict, layers: dict | None) -> None:
    from plots import grouped_bars, predicted_vs_measured

    key = f"threads{PLOT_THREADS}_batch{PLOT_BATCH}"
    key = key if all(key in e["latency"] for e in results.values()) else None
    if key and results:
        names = list(results)
        grouped_bars(RESULTS / "inference_speed.png", names,
                     {f: [results[n]["latency"][key]["ratio"].get(f, float("nan")) for n in names] for f in FORMS},
                     "latency / original (log)", f"Latency of the compressed model, {PLOT_THREADS} thread(s), batch {PLOT_BATCH}",
                     log=True, hline=1.0)
    if layers:
        points = [{"x": r["predicted_speedup"], "y": r["measured_speedup"], "label": "model layers, default m"}
                  for r in layers["model_layers"]]
        points += [{"x": r["predicted_speedup"], "y": r["measured_speedup"], "label": f"sweep m={r['m']}"}
                   for r in layers["sweep"]]
        predicted_vs_measured(RESULTS / "inference_speed_layers.png", points,
                              f"Stacked vs dense, one-Conv models ({LAYER_THREADS} thread(s), batch {LAYER_BATCH})", margin=MARGIN)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=[*zoo.MODELS, *SAMPLES], choices=[*zoo.MODELS, *SAMPLES])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=9, help="rounds of timed runs at least")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds of each variant at least")
    ap.add_argument("--layer-runs", type=int, default=15, help="rounds of timed runs a one-Conv point")
    ap.add_argument("--render", action="store_true", help="only rewrite inference_speed.md from its json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the previous results of the models not run now (each marked with its commit)")
    ap.add_argument("--no-layers", action="store_true",
                    help="skip the per-layer cost-model check (its previous results are kept, marked with their commit)")
    args = ap.parse_args()
    if args.render:
        import json

        data = json.loads((RESULTS / "inference_speed.json").read_text())
        stamp = data.pop("measured_at")
        md = markdown(data["results"], data["layers"], data)
        write_results("inference_speed", data, md, state=stamp)
        print(md)
        return
    env = environment()
    env["cpus"] = os.cpu_count()
    meta = {"args": vars(args), "environment": env, "load_before": os.getloadavg()}
    results = {}
    for name in args.models:
        entry = bench_model(name, args)
        if entry is not None:
            results[name] = entry
    if args.merge:
        results = merged(results)
    layers = previous_layers() if args.no_layers else bench_layers(list(results), args)
    meta["load_after"] = os.getloadavg()
    md = markdown(results, layers, meta)
    write_results("inference_speed", {**meta, "results": results, "layers": layers}, md)
    plot(results, layers)
    print(md)


if __name__ == "__main__":
    main()
