"""Comparing an original and a compressed model on the same data, in onnxruntime.

The first model output is taken as logits (N, K). Over all samples:

    accuracy       top-1 / top-5 hits against the labels, per model
    top1_agreement fraction of samples whose argmax agrees
    output_rel_l2  ||a - b|| / ||a||        (a: original outputs, b: compressed)
    output_cosine  mean over samples of <a_i, b_i> / (||a_i|| ||b_i||)
    snr_db         10 log10(sum ref^2 / sum (ref - out)^2) of each compressed layer's output
                   against the original Conv's output (same tensor name in both models)

For detectors and dense-output models (image-to-image, segmentation) the first output is compared the
way their users read it (tasks.py: PSNR, detections kept); `task` picks the kind when the shape cannot tell.

Latency is the median of `latency_runs` timed runs of the first batch after 3 warm-up runs, on
sessions of the unmodified models (extra probe outputs would block onnxruntime's fusions). Memory
(memory_bytes_original / _compressed) is what a session of each unmodified model takes, created with
default options and run once on the first batch, in a fresh process (runtime.session_memory).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from . import op
from .runtime import open_session, session_memory, with_outputs
from .tasks import DET_THRESHOLD, TASKS, resolve_task, task_result, totals_for
from .data import Dataset, model_inputs
from .errors import ConfigError, DataError, ModelError, one_line
from .load import load_model

WARMUP_RUNS = 3
REPORT_KEY = "onnxstack.report"


@dataclass
class _Totals:
    """Running sums over batches (float64); model 0 is the original, 1 the compressed."""

    n_layers: int
    samples: int = 0
    classes: int | None = None  # K when the first output is (N, K) logits
    top1: list = field(default_factory=lambda: [0, 0])
    top5: list = field(default_factory=lambda: [0, 0])
    agree: int = 0
    max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cosine: float = 0.0

    def __post_init__(self) -> None:
        self.layer_ref = np.zeros(self.n_layers)
        self.layer_err = np.zeros(self.n_layers)


def evaluate(original, compressed=None, data: Dataset | None = None, *, batch_size: int = 64,
             latency_runs: int = 20, threads: int | None = None,
             progress: Callable[[int], None] | None = None, task: str = "auto",
             det_threshold: float = DET_THRESHOLD, memory: bool = True) -> dict:
    """Accuracy, output agreement, per-layer SNR, sizes and latency of `original` and, if given,
    `compressed` (paths or ModelProtos) on `data`, plus the metrics of the task ("auto": told from the
    original's first output; "classify", "dense", "detect"; see tasks.py). memory=False skips the session
    memory measurement (two child processes). Returns a JSON-ready dict."""
    if not isinstance(data, Dataset):
        raise TypeError(f"evaluate() needs data=Dataset (from onnxstack.data.load_data), got {type(data).__name__}")
    _check_options(batch_size, latency_runs, threads, task, det_threshold)
    models = [load_model(original)[0]] + ([load_model(compressed)[0]] if compressed is not None else [])
    for which, model in zip(("original", "compressed"), models):
        _require_inputs(model, data, which)
    layers = _compressed_layers(models) if len(models) == 2 else []
    probed = [n for n in (l["output"] for l in layers) if n is not None]
    probes = [with_outputs(m, probed) for m in models]
    sessions = [open_session(p, threads=threads) for p in probes]
    slots = [_output_slots(p, probed) for p in probes]  # layer output -> session output index

    fixed = _fixed_batch(models[0])
    batch_size = fixed or batch_size
    totals, first, per_task, kind = _Totals(len(probed)), None, None, None
    for feeds, labels in data.batches(batch_size):
        n = len(next(iter(feeds.values())))
        feeds = _pad(feeds, fixed) if fixed and n < fixed else feeds
        first = feeds if first is None else first
        outs = [_run(s, feeds, which) for s, which in zip(sessions, ("original", "compressed"))]
        outs = [[o[:n] for o in out] for out in outs]
        if kind is None:  # told from the first batch
            kind = resolve_task(task, outs[0][0])
            per_task = totals_for(kind, det_threshold)
        _accumulate(totals, outs, labels, slots, probed)
        if per_task is not None:
            per_task.add(outs[0][0], outs[1][0] if len(outs) == 2 else None)
        if progress:
            progress(n)
    if not totals.samples:
        raise DataError(f"{data.source or 'data'}: no samples")
    if probed:  # time the unmodified models
        sessions = [open_session(m, threads=threads) for m in models]
    latency = [_latency(s, first, latency_runs) for s in sessions]
    del sessions
    sources = [original, compressed][:len(models)]
    mem = [session_memory(_file(s) or m, first, threads=threads) if memory else None for m, s in zip(models, sources)]
    result = _result(totals, layers, probed, models, sources, latency, mem, batch_size, threads,
                     data.labels is not None)
    return {**result, **task_result(kind, per_task, len(models) == 2)}


def format_evaluation(result: dict) -> str:
    """The evaluation as a table for people: models as columns, then the per-layer SNR list."""
    two = result.get("compressed_bytes") is not None
    head = ["", "original"] + (["compressed", ""] if two else [])
    ratio = result.get("latency_ratio")  # compressed / original time
    rows = [
        ["top-1 accuracy", _num(result["accuracy_original"], ".4f"), _num(result["accuracy_compressed"], ".4f")],
        ["top-5 accuracy", _num(result["top5_original"], ".4f"), _num(result["top5_compressed"], ".4f")],
        ["top-1 agreement", "", _num(result["top1_agreement"], ".4f")],
        ["output max |diff|", "", _num(result["output_max_abs"], ".3g")],
        ["output rel. L2 error", "", _num(result["output_rel_l2"], ".3g")],
        ["output cosine", "", _num(result["output_cosine"], ".5f")],
        ["latency (ms / batch)", _num(result["latency_ms_original"], ".3g"),
         _num(result["latency_ms_compressed"], ".3g"),
         _times(1 / ratio if ratio else None, "faster", "slower")],
        ["file size (bytes)", str(result["original_bytes"]), _num(result["compressed_bytes"], "d"),
         _times(result.get("file_ratio"), "smaller", "larger")],
        ["session memory (MB)", _mb(result.get("memory_bytes_original")), _mb(result.get("memory_bytes_compressed")),
         _times(1 / result["memory_ratio"] if result.get("memory_ratio") else None, "less", "more")],
        ["conv weights", "", "", _times(result.get("conv_ratio"), "smaller", "larger")],
    ]
    rows[3:3] = _task_rows(result)
    rows = [r[:len(head)] + [""] * (len(head) - len(r)) for r in rows if two or r[1]]
    rows = [r for r in rows if any(r[1:])]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    threads = result["threads"] or "default"
    task = f", task {result['task']}" if result.get("task") else ""
    lines.append(f"{result['samples']} samples, batch {result['batch_size']}, threads {threads}{task}")
    if result["layers"]:
        lines += ["", "layer SNR (dB, compressed output against the original Conv)"]
        width = max(len(e["name"]) for e in result["layers"])
        for e in result["layers"]:
            snr = "-" if e["snr_db"] is None else f"{e['snr_db']:.1f}"
            lines.append(f"  {e['name'].ljust(width)}  {snr.rjust(6)}")
    return "\n".join(lines)


def _task_rows(result: dict) -> list[list[str]]:
    """The dense / detection metrics (percent and dB) for the table; none for classification."""
    task = result.get("task")
    if task == "dense":
        return [["PSNR (dB, peak = original's range)", "", _num(result["psnr_db"], ".2f")],
                ["output rel. MSE", "", _num(result["output_rel_mse"], ".3g")],
                ["mask agreement (> 0.5) %", "", _pct(result["mask_agreement"])],
                ["pixel class agreement %", "", _pct(result["pixel_class_agreement"])]]
    if task == "detect":
        t, iou = result["det_threshold"], result["det_iou"]
        return [[f"detections (score > {t:g})", _num(result["detections_original"], "d"),
                 _num(result["detections_compressed"], "d")],
                [f"detections kept % (IoU >= {iou:g}, same class)", "", _pct(result["detections_kept"])],
                ["detections kept % (same anchor, same class)", "", _pct(result["detections_kept_same_anchor"])],
                ["extra detections %", "", _pct(result["detections_extra"])]]
    return []


# --- models -----------------------------------------------------------------------------------------


def _check_options(batch_size, latency_runs, threads, task="auto", det_threshold=DET_THRESHOLD) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(latency_runs, int) or latency_runs < 0:
        raise ConfigError(f"latency_runs must be an integer >= 0, got {latency_runs!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if isinstance(det_threshold, bool) or not isinstance(det_threshold, (int, float)) or not 0 < det_threshold < 1:
        raise ConfigError(f"det_threshold must be a number in (0, 1), got {det_threshold!r}")


def _require_inputs(model: onnx.ModelProto, data: Dataset, which: str) -> None:
    missing = [s.name for s in model_inputs(model) if s.name not in data.input_names]
    if missing:
        raise DataError(f"the {which} model has input '{missing[0]}', which the data does not provide "
                        f"(it provides {', '.join(repr(n) for n in data.input_names)})")


def _compressed_layers(models: list[onnx.ModelProto]) -> list[dict]:
    """Each StackedBinaryConv of the compressed model; output None when the original lacks that tensor."""
    produced = {o for n in models[0].graph.node for o in n.output}
    layers = []
    for i, node in enumerate(models[1].graph.node):
        if node.domain == op.DOMAIN and node.op_type == op.OP_TYPE:
            out = node.output[0]
            layers.append({"name": node.name or f"{op.OP_TYPE}_{i}", "output": out if out in produced else None})
    return layers


def _output_slots(model: onnx.ModelProto, names: list[str]) -> list[int]:
    index = {o.name: i for i, o in enumerate(model.graph.output)}
    return [index[n] for n in names]


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The static batch size (dim 0) of the model inputs, if the model was exported with one."""
    dims = {s.shape[0] for s in model_inputs(model) if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return dims.pop() if len(dims) == 1 else None


def _pad(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Repeat the last sample up to `size` (for models with a static batch dim); outputs are cut back."""
    return {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), axis=0)]) for k, v in feeds.items()}


def _run(session, feeds: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        shapes = ", ".join(f"'{k}' {v.shape}" for k, v in feeds.items())
        message = one_line(e)
        raise DataError(f"onnxruntime cannot run the {which} model on {shapes}: {message}") from None


def _latency(session, feeds: dict[str, np.ndarray] | None, runs: int) -> float | None:
    """Median milliseconds of one run on `feeds` after WARMUP_RUNS untimed runs."""
    if not runs or feeds is None:
        return None
    for _ in range(WARMUP_RUNS):
        session.run(None, feeds)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e3)


# --- metrics ----------------------------------------------------------------------------------------


def _logits(y: np.ndarray) -> np.ndarray | None:
    """(N, K) from an output of shape (N, K) or (N, K, 1, ...); None for anything else."""
    if y.ndim >= 2 and all(d == 1 for d in y.shape[2:]):
        return y.reshape(y.shape[:2])
    return None


def _accumulate(t: _Totals, outs: list[list[np.ndarray]], labels: np.ndarray | None,
                slots: list[list[int]], probed: list[str]) -> None:
    n = len(outs[0][0])
    logits = [_logits(o[0]) for o in outs]
    t.classes = logits[0].shape[1] if logits[0] is not None else None
    if labels is not None and t.classes is not None:
        if labels.max() >= t.classes:
            raise DataError(f"labels go up to {int(labels.max())}, but the model's first output "
                            f"{outs[0][0].shape} has {t.classes} classes")
        for m, y in enumerate(logits):
            t.top1[m] += int(np.sum(y.argmax(1) == labels))
            if t.classes >= 5:
                top5 = np.argpartition(-y, 4, axis=1)[:, :5]  # (n, 5)
                t.top5[m] += int(np.sum(top5 == labels[:, None]))
    t.samples += n
    if len(outs) < 2:
        return
    a, b = outs[0][0], outs[1][0]
    if a.shape != b.shape:
        raise ModelError(f"the models' first outputs differ in shape: original {a.shape}, compressed {b.shape}")
    if t.classes is not None:
        t.agree += int(np.sum(logits[0].argmax(1) == logits[1].argmax(1)))
    a, b = a.reshape(n, -1).astype(np.float64), b.reshape(n, -1).astype(np.float64)
    diff = a - b
    t.max_abs = max(t.max_abs, float(np.abs(diff).max(initial=0.0)))
    t.diff_sq += float(np.sum(diff * diff))
    t.ref_sq += float(np.sum(a * a))
    t.cosine += float(np.sum(_cosine(a, b)))
    for j, (ia, ib) in enumerate(zip(*slots)):
        ref, out = outs[0][ia].astype(np.float64), outs[1][ib].astype(np.float64)
        if ref.shape != out.shape:
            raise ModelError(f"layer output '{probed[j]}' differs in shape: original {ref.shape}, "
                             f"compressed {out.shape}")
        t.layer_ref[j] += float(np.sum(ref * ref))
        t.layer_err[j] += float(np.sum((ref - out) ** 2))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of (n, D) arrays; 1 where both rows are zero, 0 where one is."""
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), both_zero.astype(np.float64))


def _ratio_db(ref: float, err: float) -> float:
    if err == 0:
        return math.inf
    if ref == 0:
        return -math.inf
    return 10.0 * math.log10(ref / err)


def _result(t: _Totals, layers: list[dict], probed: list[str], models: list[onnx.ModelProto], sources: list,
            latency: list[float | None], memory: list[int | None], batch_size: int, threads: int | None,
            labelled: bool) -> dict:
    two = len(models) == 2
    acc = labelled and t.classes is not None
    top5 = acc and t.classes >= 5
    snr = {name: _ratio_db(r, e) for name, r, e in zip(probed, t.layer_ref, t.layer_err)}
    sizes = [_size(m, s) for m, s in zip(models, sources)] + [None] * (2 - len(models))
    latency = latency + [None] * (2 - len(latency))
    memory = memory + [None] * (2 - len(memory))
    return {
        "accuracy_original": t.top1[0] / t.samples if acc else None,
        "accuracy_compressed": t.top1[1] / t.samples if acc and two else None,
        "top5_original": t.top5[0] / t.samples if top5 else None,
        "top5_compressed": t.top5[1] / t.samples if top5 and two else None,
        "top1_agreement": t.agree / t.samples if two and t.classes is not None else None,
        "output_max_abs": t.max_abs if two else None,
        "output_rel_l2": (math.sqrt(t.diff_sq / t.ref_sq) if t.ref_sq else (0.0 if t.diff_sq == 0 else math.inf))
        if two else None,
        "output_cosine": t.cosine / t.samples if two else None,
        "layers": [{"name": l["name"], "output": l["output"], "snr_db": snr.get(l["output"])} for l in layers],
        "original_bytes": sizes[0],
        "compressed_bytes": sizes[1],
        "file_ratio": sizes[0] / sizes[1] if sizes[1] else None,
        "conv_ratio": _conv_ratio(models[1]) if two else None,
        "latency_ms_original": latency[0],
        "latency_ms_compressed": latency[1],
        "latency_ratio": latency[1] / latency[0] if latency[0] and latency[1] is not None else None,
        "memory_bytes_original": memory[0],
        "memory_bytes_compressed": memory[1],
        "memory_ratio": memory[1] / memory[0] if memory[0] and memory[1] is not None else None,
        "samples": t.samples,
        "batch_size": batch_size,
        "threads": threads,
    }


def _file(source) -> str | None:
    """The model's file, when it was given as a path (its external data beside it): read as it is."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) else None


def _size(model: onnx.ModelProto, source) -> int:
    """Bytes of the model file (the serialised size for a ModelProto)."""
    path = _file(source)
    return os.path.getsize(path) if path else model.ByteSize()


def _conv_ratio(model: onnx.ModelProto) -> float | None:
    props = {p.key: p.value for p in model.metadata_props}
    try:
        ratio = json.loads(props[REPORT_KEY])["conv_ratio"]
    except (KeyError, TypeError, ValueError):
        return None
    return float(ratio) if isinstance(ratio, (int, float)) else None


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _mb(v: int | None) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def _times(factor: float | None, better: str, worse: str) -> str:
    """'2.5x smaller' for a factor of 2.5, '1.3x larger' for 1/1.3."""
    if not factor:
        return ""
    return f"{factor:.2f}x {better}" if factor >= 1 else f"{1 / factor:.2f}x {worse}"
