"""PNG plots for the benchmark scripts (matplotlib, the `bench` extra), written beside their JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str, *,
                 errors: dict[str, list[tuple[float, float]]] | None = None, log: bool = False,
                 hline: float | None = None) -> Path:
    """One group of bars per entry of `groups`, one bar per series; errors: (low, high) per bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(groups), 3.6))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        pos = x + (i - (len(series) - 1) / 2) * width
        yerr = None
        if errors and name in errors:
            lo, hi = np.array(errors[name], dtype=float).T
            yerr = np.vstack([np.array(values) - lo, hi - np.array(values)])
        ax.bar(pos, values, width, label=name, yerr=yerr, capsize=2)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predicted_vs_measured(path: Path, points: list[dict], title: str, *, margin: float | None = None) -> Path:
    """Scatter of predicted (x) against measured (y) ratios, log-log, with the identity line.
    points: dicts with x, y and label (one colour a label); margin draws the decision threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for label in dict.fromkeys(p["label"] for p in points):
        sel = [p for p in points if p["label"] == label]
        ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], s=18, label=label)
    values = [v for p in points for v in (p["x"], p["y"])]
    lo, hi = min(values + [0.5]) / 1.2, max(values + [2.0]) * 1.2
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="measured = predicted")
    ax.axhline(1.0, color="grey", linewidth=0.6)
    if margin:
        ax.axvline(margin, color="red", linewidth=0.8, linestyle="--", label=f"cost model picks stacked (x > {margin})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted speed-up of stacked over dense (MAC ratio)")
    ax.set_ylabel("measured speed-up (latency ratio)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_ratio(results_dir: Path) -> Path | None:
    """Top-1 against conv ratio of the sample models, one panel a model: bench/accuracy.py's rows
    (baselines, onnxstack without data and calibrated) and bench/finetune.py's fine-tuned rows, read
    from their JSON results. Written to accuracy_vs_ratio.png; None without accuracy.json."""
    import json

    acc_path, ft_path = results_dir / "accuracy.json", results_dir / "finetune.json"
    if not acc_path.exists():
        return None
    acc_data = json.loads(acc_path.read_text())
    accuracy = acc_data["results"]
    finetuned = json.loads(ft_path.read_text())["results"] if ft_path.exists() else []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(accuracy), figsize=(5.4 * len(accuracy), 4.2), squeeze=False)
    for ax, (model, rows) in zip(axes[0], accuracy.items()):
        original = next(r["accuracy"] for r in rows if r["method"].startswith("fp32"))
        kinds = {
            "onnxruntime int8 / int4": [r for r in rows if r["method"].startswith("onnxruntime")],
            "binary weights": [r for r in rows if r["method"].startswith("binary")],
            "onnxstack, no data": [r for r in rows if "no data" in r["method"]],
            "onnxstack, calibrated": [r for r in rows if r["method"].startswith("onnxstack") and "calibrated" in r["method"]],
        }
        markers = {"onnxruntime int8 / int4": "s", "binary weights": "v", "onnxstack, no data": "x",
                   "onnxstack, calibrated": "o"}
        for kind, sel in kinds.items():
            ax.scatter([r["conv_ratio"] for r in sel], [100 * r["accuracy"] for r in sel], marker=markers[kind],
                       s=28, label=kind)
        tuned = [r for r in finetuned if r["model"].split(",")[0] == model]
        if tuned:
            ax.scatter([r["conv_ratio"] for r in tuned], [100 * r["accuracy_finetuned"] for r in tuned], marker="*",
                       s=90, label="onnxstack, fine-tuned (bench/finetune.py)")
        ax.axhline(100 * original, color="black", linewidth=0.8, linestyle="--", label="fp32 original")
        ax.set_xscale("log")
        ticks = [t for t in (2, 4, 8, 16, 32, 64, 128, 256) if t <= 1.5 * max(
            [r["conv_ratio"] for r in rows] + [r["conv_ratio"] for r in tuned])]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("conv ratio (every stored bit of the convolutions)")
        n_test = acc_data.get("images", {}).get(model, {}).get("test_images")  # recorded since the commit stamp
        ax.set_ylabel(f"top-1 % ({n_test:,} test images)" if n_test else "top-1 % (test images)")
        ax.set_ylim(0, 101)  # the whole range: collapse to chance is part of the picture
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = results_dir / "accuracy_vs_ratio.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def redraw_accuracy_vs_ratio(results_dir: Path) -> None:
    """accuracy_vs_ratio.png, or a line saying why not (matplotlib is the `bench` extra); called by
    bench/accuracy.py and bench/finetune.py when they have written their results."""
    try:
        accuracy_vs_ratio(results_dir)
    except ImportError as e:
        print(f"no plot ({e})")


if __name__ == "__main__":  # regenerate the plots that depend on several scripts' results
    import sys

    sys.exit(0 if accuracy_vs_ratio(Path(__file__).resolve().parent / "results") else 1)
