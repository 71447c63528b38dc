"""`onnxstack evaluate ORIGINAL [COMPRESSED] --data D`: accuracy, agreement, layer SNR, sizes, latency."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from onnxstack.data import load_data
from onnxstack.evaluate import evaluate as run_evaluation
from onnxstack.evaluate import format_evaluation
from onnxstack.tasks import DET_THRESHOLD, TASKS
from onnxstack.io import check_output_path, write_bytes_atomic

from .common import handle_errors
from .options import image_options, make_image_options


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("compressed", type=click.Path(path_type=Path), required=False)
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help=".npz (one array per model input, optional 'labels') or a folder of images "
                   "(flat, or one sub-folder per class).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use a seeded random subset of N samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads [onnxruntime's default].")
@click.option("--latency-runs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Timed runs of one batch (0: none).")
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True,
              help="What the model's first output is: classifier logits, a dense map (image-to-image, "
                   "segmentation: PSNR), or detections (N, anchors, 5+classes: detections kept) [auto: its shape].")
@click.option("--det-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DET_THRESHOLD,
              show_default=True, help="Detections: objectness x class probability above which an anchor counts.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure the memory a session of each model takes (created and run once, in a fresh process).")
@image_options
@click.option("--overwrite", is_flag=True, help="Replace an existing JSON file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; one summary line instead of the table.")
@handle_errors
def evaluate(original, compressed, data_path, json_path, batch_size, limit, seed, threads, latency_runs, task,
             det_threshold, memory, image_size,
             channels, pixel_scale, mean, std, layout, overwrite, quiet):
    """Run ORIGINAL (and COMPRESSED) on the data; compare accuracy, outputs, layer SNR, size, latency and memory."""
    options = make_image_options(image_size, channels, pixel_scale, mean, std, layout)
    if json_path is not None:
        for source in (original, compressed, data_path):
            check_output_path(json_path, overwrite=overwrite, source=source if source and source.exists() else None)
    data = load_data(data_path, original, limit=limit, seed=seed, image_options=options)
    with contextlib.ExitStack() as stack:
        bar = []  # opened at the first batch, so that setup errors print alone

        def progress(n: int) -> None:
            if not bar:
                bar.append(stack.enter_context(click.progressbar(
                    length=len(data), label="evaluating", file=sys.stderr, hidden=quiet)))
            bar[0].update(n)

        result = run_evaluation(original, compressed, data, batch_size=batch_size, latency_runs=latency_runs,
                                threads=threads, progress=progress, task=task, det_threshold=det_threshold,
                                memory=memory)
    if json_path is not None:
        write_bytes_atomic(json.dumps(result, indent=2).encode(), json_path)
    if quiet:
        click.echo(summary_line(result))
        return
    click.echo(format_evaluation(result))
    if json_path is not None:
        click.echo(f"wrote {json_path}")


def summary_line(result: dict) -> str:
    """`evaluate -q`: one line, accuracies in percent and the drop in points."""
    def pct(v):
        return f"{100 * v:.2f}%"

    parts = []
    if result.get("accuracy_original") is not None:
        parts.append(f"top-1 original {pct(result['accuracy_original'])}")
        if result.get("accuracy_compressed") is not None:
            drop = 100 * (result["accuracy_original"] - result["accuracy_compressed"])
            parts.append(f"compressed {pct(result['accuracy_compressed'])} (drop {drop:.2f} points)")
    if result.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {pct(result['top1_agreement'])}")
    if result.get("psnr_db") is not None:
        parts.append(f"PSNR {result['psnr_db']:.2f} dB")
    if result.get("detections_kept") is not None:
        parts.append(f"detections kept {pct(result['detections_kept'])} (IoU >= {result['det_iou']:g}, same class)")
    elif result.get("task") == "detect":
        parts.append(f"{result['detections_original']} detections (score > {result['det_threshold']:g})")
    parts.append(f"{result['samples']} samples")
    return ", ".join(parts)
