"""The ladder: where `--target-ratio R` lands for every R from 4 to 100, on the sample models and the real
pretrained models of bench/real_models.py (issue 12: within 15 % of R everywhere).

    python bench/ladder.py [--models fashion_cnn mnist_cnn efficientnet_lite0 hed ddddocr_ocr ddddocr_det]
                           [--calibration 16] [--confirm 6 24 80]

What a target lands on is decided by the settings search: every layer's candidates (their bits and
measured damage, search.layer_candidates_all) and the allocations built from them
(search.Candidates.choices: the least-summed-damage one and the alternatives the allocation check
builds and measures). The candidates are computed once a model, on a small calibration set (the bits of a
candidate do not depend on the data; which candidate wins does), and every R is allocated from them; the
table gives the lowest and the highest ratio over the allocations of R. --confirm runs the whole
`onnxstack.compress` at a few R on the sample models, to show that the written model's conv ratio is the
allocation's; the real models' full compressions at 8/16/32/64 are in bench/results/real_models.md, and
the table repeats their conv ratios. Writes bench/results/ladder.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxstack  # noqa: E402
import common  # noqa: E402
from common import REPO, SAMPLES, bench_model, load_npz, write_results  # noqa: E402
from onnxstack.errors import ConfigError  # noqa: E402
from onnxstack.pipeline import load_stage, opset_stage  # noqa: E402
from onnxstack.search import layer_candidates_all  # noqa: E402

TARGETS = (4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 56, 64, 80, 100)
TOLERANCE = 1.15


def model_and_data(name: str, n: int, tmp: Path) -> tuple[onnx.ModelProto, dict]:
    model = bench_model(name, tmp)
    if name in SAMPLES:
        calib, _ = load_npz(SAMPLES[name][2])
        return model, {model.graph.input[0].name: calib["input"][:n]}
    import real_models as rm

    task = rm.tasks()[name]
    return model, {task.input_name: task.calib(False)[:n]}


def ladder(model: onnx.ModelProto, feeds: dict, targets) -> tuple[list[dict], float, float]:
    """(rows, seconds of the candidates, the highest ratio the candidates reach)."""
    config = onnxstack.CompressConfig()
    # prepared as compress prepares it for a search: normalised, upgraded to the opset int4 weights need
    model, infos, _ = opset_stage(load_stage(model).model, config, searching=True)
    t = time.perf_counter()
    candidates = layer_candidates_all(model, infos, feeds, config)
    seconds = time.perf_counter() - t
    rows = []
    for r in targets:
        try:
            ratios = [candidates.total_bits / (candidates.fixed_bits + sum(c.bits for c in choice.values()))
                      for _, choice in candidates.choices(r)]
        except ConfigError as e:
            rows.append({"target": r, "error": str(e)})
            continue
        lo, hi = min(ratios), max(ratios)
        rows.append({"target": r, "low": lo, "high": hi, "allocations": len(ratios),
                     "within": bool(r / TOLERANCE <= lo and hi <= r * TOLERANCE)})
    return rows, seconds, candidates.max_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["fashion_cnn", "mnist_cnn", "efficientnet_lite0", "hed", "ddddocr_ocr", "ddddocr_det"])
    ap.add_argument("--calibration", type=int, default=16, help="calibration samples of the candidates")
    ap.add_argument("--confirm", nargs="+", type=float, default=[6, 24, 80],
                    help="targets compressed in full on the sample models")
    ap.add_argument("--merge", action="store_true", help="keep the other models of bench/results/ladder.json")
    args = ap.parse_args()
    logging.getLogger("onnxstack").setLevel(logging.ERROR)  # the data check's warnings are expected here
    results = {"targets": list(TARGETS), "calibration": args.calibration, "tolerance": TOLERANCE, "models": {}}
    old = REPO / "bench" / "results" / "ladder.json"
    if args.merge and old.exists():
        kept = json.loads(old.read_text())
        stamp = kept.get("measured_at", {}).get("commit", "")
        results["models"] = {n: {"commit": stamp, **e} for n, e in kept["models"].items()}  # the order stays
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, feeds = model_and_data(name, args.calibration, Path(tmp))
            rows, seconds, top = ladder(model, feeds, TARGETS)
            entry = {"rows": rows, "candidate_seconds": seconds, "max_ratio": top, "confirmed": [],
                     "commit": common.START_STATE.get("commit", "")}
            if name in SAMPLES:
                for r in args.confirm:
                    report = onnxstack.compress(model, data=feeds, target_ratio=r).report
                    entry["confirmed"].append({"target": r, "conv_ratio": report["conv_ratio"]})
            results["models"][name] = entry
            print(name, json.dumps(entry), flush=True)
    write_results("ladder", results, render(results))


def real_model_ratios() -> dict:
    """The conv ratios of the real models' full compressions with a target (bench/results/real_models.json)."""
    path = REPO / "bench" / "results" / "real_models.json"
    out: dict = {}
    if not path.exists():
        return out
    for name, info in json.loads(path.read_text()).get("results", {}).items():
        for row in info.get("rows", []):
            label = row.get("method", "")
            if "target" in label and "conv_ratio" in row:
                out.setdefault(name, []).append((label.rsplit("target ", 1)[1], row["conv_ratio"]))
    return out


def render(results: dict) -> str:
    targets = results["targets"]
    lines = [f"Where `--target-ratio R` lands (conv ratio, over every weight the tool can touch), for R from "
             f"{targets[0]} to {targets[-1]}: the allocations of the settings search from one candidate set a model "
             f"({results['calibration']} calibration samples); 'a-b' when the allocation check's alternatives land "
             f"apart (it builds each and keeps the one whose outputs move least). Bold: outside "
             f"{(results['tolerance'] - 1) * 100:.0f} % of R.", "",
             "| R | " + " | ".join(results["models"]) + " |", "|---:|" + "---:|" * len(results["models"])]
    for i, r in enumerate(targets):
        cells = []
        for entry in results["models"].values():
            row = entry["rows"][i]
            if "error" in row:
                cells.append("**out of reach**")
                continue
            text = f"{row['low']:.1f}" if abs(row["high"] - row["low"]) < 0.05 else f"{row['low']:.1f}-{row['high']:.1f}"
            cells.append(text if row["within"] else f"**{text}**")
        lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
    misses = {n: [r["target"] for r in e["rows"] if not r.get("within")] for n, e in results["models"].items()}
    lines += ["", "Within the tolerance at every R: " + "; ".join(
        f"{n}: {'yes' if not m else 'no (' + ', '.join(f'{t:g}' for t in m) + ')'}" for n, m in misses.items()) + "."]
    commits = {e.get("commit", "")[:12] for e in results["models"].values()}
    if len(commits) > 1:
        lines.append("Models measured at different commits: " + ", ".join(
            f"{n} {e.get('commit', '')[:12]}" for n, e in results["models"].items()) + ".")
    lines.append("Candidate time (s, once a model): " + ", ".join(
        f"{n} {e['candidate_seconds']:.0f}" for n, e in results["models"].items()) + "; highest ratio the candidates "
        "reach: " + ", ".join(f"{n} {e['max_ratio']:.0f}x" for n, e in results["models"].items()) + ".")
    confirmed = [f"{n} R={c['target']:g}: {c['conv_ratio']:.1f}x" for n, e in results["models"].items()
                 for c in e["confirmed"]]
    if confirmed:
        lines.append("Whole compressions (onnxstack.compress, same data) of the sample models: " + "; ".join(confirmed) + ".")
    real = real_model_ratios()
    shown = {n: v for n, v in real.items() if n in results["models"]}
    if shown:
        lines.append("Whole compressions of the real models with a target (bench/results/real_models.md, target: conv "
                     "ratio): " + "; ".join(f"{n} " + ", ".join(f"{t} {c:.1f}x" for t, c in v) for n, v in shown.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
