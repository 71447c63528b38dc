"""Fine-tuning on the sample models: compress hard, fine-tune by distillation, measure the top-1 drop.

    python bench/finetune.py [--models fashion_cnn mnist_cnn] [--data-dir ../shared/data] [--threads 2]

For each model: compress at a high conv ratio (calibrated on the sample's calibration file), score the
post-training model, fine-tune it on the training split for a fixed wall-time budget (--threads torch threads;
a share of the split held out to pick the best epoch, HELDOUT_MAX images or HELDOUT_PERCENT of the split if
fewer; the test images are never seen), write the file back, and score it in onnxruntime on the sample's test
images with onnxstack's evaluate (what `onnxstack evaluate` prints). The training splits are the ones
scripts/train_samples.py trained the models on (sklearn train_test_split, stratified, random_state=0, the
test_size of each row of RUNS held out). The table's header states the counts and threads of the run.

Writes bench/results/finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads yield on a shared machine

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import onnxstack  # noqa: E402
from common import RESULTS, REPO, SAMPLES, conv_bits, environment, load_npz, predict, write_results  # noqa: E402
from onnxstack.config import LayerOverride  # noqa: E402
from onnxstack.core import cost  # noqa: E402
from onnxstack.data import from_arrays  # noqa: E402
from onnxstack.evaluate import evaluate  # noqa: E402
from plots import redraw_accuracy_vs_ratio  # noqa: E402

HELDOUT_MAX, HELDOUT_PERCENT = 5000, 10  # the share of the training split that picks the epoch kept
BAR_MINUTES = 10  # the bar: fine-tuning within this many minutes

# one row each: model, training data file and its test split size, the bar, compression (config, or
# target_ratio: onnxstack's own per-layer allocation, as `--target-ratio`) and fine-tuning settings.
RUNS = [
    dict(label="fashion_cnn, labels 0.5", setting="d=16, 2 slices a codeword", model="fashion_cnn", data="fashion_mnist70k.npz", test_size=10000, bar_ratio=50,
         bar_drop=1.5, compress=dict(slice_dim=16, slices_per_codeword=2),
         finetune=dict(epochs=6, batch_size=128, lr=2e-3, latent_lr=1e-4, labels_weight=0.5, max_minutes=9.0)),
    dict(label="fashion_cnn, no labels", setting="d=16, 2 slices a codeword", model="fashion_cnn", data="fashion_mnist70k.npz", test_size=10000,
         bar_ratio=50, bar_drop=1.5, compress=dict(slice_dim=16, slices_per_codeword=2),
         finetune=dict(epochs=6, batch_size=128, lr=2e-3, latent_lr=1e-4, max_minutes=9.0)),
    dict(label="mnist_cnn, target 100x, labels 0.5", setting="--target-ratio 100", model="mnist_cnn", data="mnist10k.npz", test_size=2000,
         bar_ratio=100, bar_drop=1.0, compress=dict(), target_ratio=100,
         finetune=dict(epochs=100, batch_size=64, lr=2e-3, latent_lr=1e-4, labels_weight=0.5, max_minutes=9.0)),
    dict(label="mnist_cnn, target 100x, no labels", setting="--target-ratio 100", model="mnist_cnn", data="mnist10k.npz", test_size=2000,
         bar_ratio=100, bar_drop=1.0, compress=dict(), target_ratio=100,
         finetune=dict(epochs=100, batch_size=64, lr=2e-3, latent_lr=1e-4, max_minutes=9.0)),
]


def training_split(path: Path, test_size: int):
    """The training part of scripts/train_samples.py's split: float32 (N, 1, 28, 28) in [0, 1], int64 labels."""
    with np.load(path) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    x_train, _, y_train, _ = train_test_split(images, labels, test_size=test_size, stratify=labels, random_state=0)
    return (x_train.astype(np.float32) / 255.0)[:, None], y_train


def max_conv_ratio(model: onnx.ModelProto) -> float:
    """The highest conv ratio onnxstack's bit accounting allows: every Conv at its cheapest setting
    (any slice depth d, one 8-codeword byte row, per-filter or per-slice scales, one term), biases kept."""
    inits = {t.name: t for t in model.graph.initializer}
    original = cheapest = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        n, c, kh, kw = inits[node.input[1]].dims
        bias = len(node.input) > 2 and bool(node.input[2])
        dense = cost.dense_bits(n, c, kh, kw, bias)
        options = [cost.compressed_bits(n, -(-c // d), d, kh, kw, 2, scale, bias)["total"]
                   for d in range(1, c + 1) for scale in ("filter", "slice") if n * -(-c // d) >= 2]
        original, cheapest = original + dense, cheapest + min([dense, *options])
    return original / cheapest


def run_model(spec: dict, data_dir: Path, threads: int, tmp: Path, overrides: dict) -> dict:
    from onnxstack.torch_bridge import FinetuneConfig, finetune

    name = spec["model"]
    model_path, test_path, calib_path = (REPO / p for p in SAMPLES[name])
    original = onnx.load(model_path)
    test_feeds, test_labels = load_npz(test_path)
    calib, _ = load_npz(calib_path)
    x_train, y_train = training_split(data_dir / spec["data"], spec["test_size"])
    x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=min(HELDOUT_MAX, len(x_train) * HELDOUT_PERCENT // 100),
                                                      stratify=y_train, random_state=0)

    t0 = time.perf_counter()
    result = onnxstack.compress(original, onnxstack.CompressConfig(**spec["compress"]), data=calib,
                                target_ratio=spec.get("target_ratio"))
    compress_s = time.perf_counter() - t0
    ratio = result.report["conv_ratio"]
    acc = lambda m: float(np.mean(predict(m, test_feeds, threads=threads).argmax(1) == test_labels))  # noqa: E731
    acc_orig, acc_post = acc(original), acc(result.model)
    print(f"{spec['label']}: conv ratio {ratio:.1f}x, original {acc_orig:.4f}, post-training {acc_post:.4f}", flush=True)

    config = FinetuneConfig(threads=threads, **{**spec["finetune"], **overrides})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tuned = finetune(result.model, original, (x_train, y_train), val=(x_val, y_val), config=config, callback=_log)
    minutes = (time.perf_counter() - t0) / 60
    out = tuned.save(tmp / f"{name}.{len(list(tmp.iterdir()))}.ft.onnx")
    test = from_arrays(test_feeds, original, test_labels, source=str(test_path))
    ev = evaluate(model_path, out, test, batch_size=500, latency_runs=0, threads=threads)
    held = evaluate(model_path, out, from_arrays({"input": x_val}, original, y_val), batch_size=500, latency_runs=0,
                    threads=threads)
    best = tuned.best
    row = {
        "model": spec["label"], "setting": spec["setting"], "finetune_setting": spec["label"].split(", ")[-1],
        "conv_ratio": ratio, "max_possible_conv_ratio": max_conv_ratio(original), "conv_ratio_recount": conv_bits(original) / conv_bits(tuned.model),
        "accuracy_original": acc_orig, "accuracy_post_training": acc_post,
        "accuracy_finetuned": ev["accuracy_compressed"], "accuracy_original_evaluate": ev["accuracy_original"],
        "drop_post_training": 100 * (acc_orig - acc_post), "drop_finetuned": 100 * (acc_orig - ev["accuracy_compressed"]),
        "agreement_finetuned": ev["top1_agreement"],
        "finetune_minutes": minutes, "compress_seconds": compress_s, "threads": threads,
        "train_samples": len(x_train), "test_samples": len(test_labels), "best_epoch": tuned.best_epoch,
        "heldout_samples": len(x_val), "heldout_accuracy_loop": best.get("accuracy"),
        "heldout_accuracy_evaluate": held["accuracy_compressed"],
        "bar": {"conv_ratio": spec["bar_ratio"], "max_drop_points": spec["bar_drop"], "max_minutes": BAR_MINUTES},
        "compress_config": result.config.to_dict(), "finetune_config": config.to_dict(), "history": tuned.history,
        "file_bytes": out.stat().st_size, "load_average_1min": [load_before, os.getloadavg()[0]],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    row["meets_bar"] = (ratio >= spec["bar_ratio"] and row["drop_finetuned"] <= spec["bar_drop"] and minutes <= BAR_MINUTES)
    print(f"{spec['label']}: fine-tuned {row['accuracy_finetuned']:.4f} (drop {row['drop_finetuned']:.2f} points) "
          f"in {minutes:.1f} min", flush=True)
    return row


def _log(event: str, info: dict) -> None:
    if event == "epoch_end":
        acc = f" accuracy {info['accuracy']:.4f}" if "accuracy" in info else ""
        print(f"  epoch {info['epoch']}{acc} agreement {info['agreement']:.4f} KL {info['kl']:.4f} "
              f"({info.get('minutes', 0):.1f} min)", flush=True)


def markdown(rows: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"].split(",")[0] for r in rows))
    by_model = lambda key: ", ".join(f"{m} {_values([r for r in rows if r['model'].split(',')[0] == m], key)}"  # noqa: E731
                                     for m in models)
    lines = [f"Fine-tuning by distillation: test images {by_model('test_samples')}; {_values(rows, 'threads')} torch "
             f"thread(s); the epoch kept is the best on a held-out share of the training split (at most "
             f"{HELDOUT_MAX:,} images, or {HELDOUT_PERCENT}% if fewer: {by_model('heldout_samples')}), "
             f"training images {by_model('train_samples')}. Bar of the issue: conv ratio, top-1 drop, "
             f"{_values([r['bar'] for r in rows], 'max_minutes')} minutes. "
             "Baselines (same test images) from bench/results/accuracy.json.", "",
             "| model | method | conv ratio | top-1 % | drop (points) | fine-tune min | held-out % loop / evaluate | "
             "bar | met |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    baselines = _baselines()
    for model in models:
        shown = set()
        for r in [r for r in rows if r["model"].split(",")[0] == model]:
            bar = f">= {r['bar']['conv_ratio']}x, <= {r['bar']['max_drop_points']} pt"
            post = f"| {model} | onnxstack post-training, calibrated ({r['setting']}) | {r['conv_ratio']:.1f}x | " \
                   f"{100 * r['accuracy_post_training']:.2f} | {r['drop_post_training']:.2f} | | | | |"
            if post not in shown:  # one post-training row per compression setting
                shown.add(post)
                lines.append(post)
            lines.append(f"| {model} | onnxstack fine-tuned, {r['finetune_setting']} ({r['setting']}) | {r['conv_ratio']:.1f}x | "
                         f"{100 * r['accuracy_finetuned']:.2f} | {r['drop_finetuned']:.2f} | "
                         f"{r['finetune_minutes']:.1f} | {100 * r['heldout_accuracy_loop']:.2f} / "
                         f"{100 * r['heldout_accuracy_evaluate']:.2f} | {bar} | {'yes' if r['meets_bar'] else 'no'} |")
        for b in baselines.get(model, []):
            lines.append(f"| {model} | {b['method']} | {b['conv_ratio']:.1f}x | {100 * b['accuracy']:.2f} | "
                         f"{b['drop']:.2f} | | | | |")
    return "\n".join(lines)


def _values(rows: list[dict], key: str) -> str:
    """The distinct values of rows[i][key] as the run recorded them ('2', '2 / 4'; '?' where a row lacks it)."""
    seen = dict.fromkeys(f"{r[key]:,}" if isinstance(r.get(key), int) else str(r.get(key, "?")) for r in rows)
    return " / ".join(seen) or "?"


def _baselines() -> dict[str, list[dict]]:
    """The fp32 and onnxruntime int8 / int4 rows of bench/accuracy.py's results, by model."""
    path = RESULTS / "accuracy.json"
    if not path.exists():
        return {}
    out = {}
    for model, rows in json.loads(path.read_text())["results"].items():
        original = next((r["accuracy"] for r in rows if r["method"].startswith("fp32")), None)
        out[model] = [{"method": r["method"], "conv_ratio": r["conv_ratio"], "accuracy": r["accuracy"],
                       "drop": 100 * (original - r["accuracy"])}
                      for r in rows if r["method"].startswith("onnxruntime") and original is not None]
    return out


def _merge_previous(rows: list[dict], name: str) -> list[dict]:
    """A partial run replaces its rows in the previous results and keeps the others (in RUNS order)."""
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text())["results"] if path.exists() else []
    by_label = {r["model"]: r for r in previous} | {r["model"]: r for r in rows}
    order = [spec["label"] for spec in RUNS]
    return sorted(by_label.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=sorted({r["model"] for r in RUNS}),
                    choices=sorted({r["model"] for r in RUNS}))
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--rows", nargs="+", metavar="TEXT", help="only the rows whose label contains one of these")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, help="override the fine-tuning time budget")
    ap.add_argument("--epochs", type=int, help="override the epoch count")
    ap.add_argument("--results-name", default="finetune", help="bench/results/NAME.{json,md} [finetune]")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("max_minutes", args.max_minutes), ("epochs", args.epochs)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_model(spec, args.data_dir, args.threads, Path(tmp), overrides)
                for spec in RUNS if spec["model"] in args.models
                and (not args.rows or any(t in spec["label"] for t in args.rows))]
    if args.rows or len(args.models) < len({r["model"] for r in RUNS}):
        rows = _merge_previous(rows, args.results_name)
    md = markdown(rows)
    write_results(args.results_name, {"environment": environment(), "results": rows}, md)
    redraw_accuracy_vs_ratio(RESULTS)  # from this script's results and the other's
    print(md)
    return 0 if all(r["meets_bar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
