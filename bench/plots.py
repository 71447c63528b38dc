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
