"""`onnxstack finetune COMPRESSED --teacher ORIGINAL --data D`: distil the original into the compressed model.

Runs as is on one process, or under `torchrun --nproc_per_node=N` with DistributedDataParallel (rank 0
prints and writes). A checkpoint OUT.ckpt is kept while training; `--resume` continues from it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from onnxstack.data import load_data
from onnxstack.errors import ConfigError, OutputError
from onnxstack.io import check_output_path

from .common import handle_errors, option_error
from .options import image_options, make_image_options


# FinetuneConfig fields -> the options that set them
FINETUNE_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "lr", "latent_lr", "labels_weight", "temperature", "feature_weight", "reassign_every", "augment_shift",
    "augment_flip", "val_fraction", "max_minutes", "device", "threads", "seed")}
FINETUNE_FLAGS.update({"epochs": "-e/--epochs", "batch_size": "-b/--batch-size", "train": "--train"})


def default_output(compressed: Path) -> Path:
    name = compressed.name[:-5] if compressed.name.endswith(".onnx") else compressed.name
    return compressed.with_name(f"{name}.ft.onnx")


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".ckpt")


@click.command("finetune", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("compressed", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="The original (uncompressed) model.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="Training inputs: .npz (optional 'labels') or a folder of images.")
@click.option("--val", "val_path", type=click.Path(path_type=Path),
              help="Held-out data scored each epoch [a --val-fraction share of --data].")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [COMPRESSED.ft.onnx].")
@click.option("-e", "--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Passes over the training data (fewer when --max-minutes runs out first).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True,
              help="AdamW learning rate (scales, biases, dense layers).")
@click.option("--latent-lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of the latent codebooks (bit flips).")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Global batch (split over torchrun processes).")
@click.option("--labels-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the cross-entropy on labels (needs labels in --data).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Softmax temperature of the distillation loss.")
@click.option("--feature-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of matching each compressed layer's output to the original's.")
@click.option("--train", "train_set", type=click.Choice(["all", "compressed"]), default="all", show_default=True,
              help="Train every float parameter, or only the compressed layers.")
@click.option("--reassign-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Re-pick codeword indices against the original weights every K epochs (0: never).")
@click.option("--augment-shift", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random image translation of up to N pixels.")
@click.option("--augment-flip", is_flag=True, help="Random horizontal flips of images.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of --data held out when --val is not given.")
@click.option("--limit", type=click.IntRange(min=1), help="Use a seeded random subset of N training samples.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), help="Stop training after this wall time.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:K or auto.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [torch's default].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split, order and --limit.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.ckpt.")
@image_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and start over from a stale checkpoint).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
@handle_errors
def finetune(compressed, teacher, data_path, val_path, output, epochs, lr, latent_lr, batch_size, labels_weight,
             temperature, feature_weight, train_set, reassign_every, augment_shift, augment_flip, val_fraction, limit,
             max_minutes, device, threads, seed, resume, image_size, channels, pixel_scale, mean, std, layout, overwrite,
             quiet):
    """Fine-tune COMPRESSED by distillation from --teacher; write the learned values back into the ONNX file."""
    from onnxstack.torch_bridge import FinetuneConfig
    from onnxstack.torch_bridge.dist import world_from_env

    main = world_from_env()[0] == 0
    output = output or default_output(compressed)
    ckpt = checkpoint_path(output)
    check_output_path(output, overwrite=overwrite, source=compressed if compressed.exists() else None)
    if ckpt.exists() and not (resume or overwrite):
        raise OutputError(f"{ckpt}: a checkpoint of an earlier run exists; pass --resume to continue it "
                          "or --overwrite to start over")
    try:
        config = FinetuneConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, latent_lr=latent_lr, temperature=temperature,
            labels_weight=labels_weight, feature_weight=feature_weight, train=train_set, reassign_every=reassign_every,
            augment_shift=augment_shift, augment_flip=augment_flip, val_fraction=val_fraction, max_minutes=max_minutes,
            device=device, threads=threads, seed=seed)
    except ConfigError as e:
        raise option_error(e, FINETUNE_FLAGS) from None
    options = make_image_options(image_size, channels, pixel_scale, mean, std, layout)
    data = load_data(data_path, teacher, limit=limit, seed=seed, image_options=options)
    val = load_data(val_path, teacher, image_options=options) if val_path else None
    result = run_finetune(compressed, teacher, data, config, val=val, checkpoint=ckpt, resume=resume,
                          quiet=quiet or not main)
    if not main:
        return
    result.save(output, overwrite=overwrite)
    ckpt.unlink(missing_ok=True)
    if not quiet:
        click.echo(format_history(result))
        click.echo(f"wrote {output}")


def finetune_after_compress(result, model: Path, data_path: Path | None, epochs: int, image_options,
                            *, seed: int = 0, quiet: bool = False) -> None:
    """`compress --finetune-epochs E`: fine-tune result.model in place against the input model, on all of
    --data (not the calibration subset), with the default settings."""
    from onnxstack.torch_bridge import FinetuneConfig

    if data_path is None:
        raise ConfigError("--finetune-epochs needs training inputs: pass --data")
    data = load_data(data_path, model, seed=seed, image_options=image_options)
    tuned = run_finetune(result.model, model, data, FinetuneConfig(epochs=epochs, seed=seed), quiet=quiet)
    result.model = tuned.model
    result.report["finetune"] = {"epochs": epochs, "best_epoch": tuned.best_epoch, "metric": tuned.metric,
                                 "history": tuned.history, "written_model": tuned.onnx_metrics}
    if not quiet:
        click.echo(format_history(tuned), err=True)


def run_finetune(compressed, teacher, data, config, *, val=None, checkpoint: Path | None = None,
                 resume: bool = False, quiet: bool = False):
    """Fine-tune with a progress bar per epoch (loss, agreement); also the `compress --finetune-epochs` step.

    compressed / teacher: paths or ModelProtos; data / val: onnxstack Datasets. Returns a FinetuneResult.
    """
    from onnxstack.torch_bridge import finetune as run

    with contextlib.ExitStack() as stack:
        bars: list = []

        def show(event: str, info: dict) -> None:
            if event == "epoch_start":
                stack.close()
                bars[:] = [stack.enter_context(click.progressbar(
                    length=info["steps"], label=f"epoch {info['epoch']}/{info['epochs']}", file=sys.stderr,
                    hidden=quiet, item_show_func=lambda s: s, show_pos=True))]
            elif event == "step" and bars:
                bars[0].update(1, f"loss {info['loss']:.4f}  agree {info['agreement']:.3f}")
            elif event == "epoch_end":  # the scores are shown once, in the table at the end
                stack.close()
                bars.clear()

        try:
            return run(compressed, teacher, data, val=val, config=config, checkpoint=checkpoint, resume=resume,
                       callback=show)
        except KeyboardInterrupt:
            stack.close()
            where = f"; rerun with --resume to continue from {checkpoint}" if checkpoint and checkpoint.exists() else ""
            click.echo(f"onnxstack: interrupted{where}", err=True)
            sys.exit(130)


def format_history(result) -> str:
    """Per-epoch held-out scores, the kept epoch marked, and the written file's score in onnxruntime."""
    has_acc = any("accuracy" in r for r in result.history)
    head = ["epoch", "accuracy", "agreement", "KL", "minutes"] if has_acc else ["epoch", "agreement", "KL", "minutes"]
    rows = []
    for r in result.history:
        mark = " *" if r["epoch"] == result.best_epoch else ""
        row = [f"{r['epoch']}{mark}"] + ([f"{r['accuracy']:.4f}"] if has_acc else [])
        row += [f"{r['agreement']:.4f}", f"{r['kl']:.4f}", "-" if r.get("minutes") is None else f"{r['minutes']:.1f}"]
        rows.append(row)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    n = result.history[0]["samples"]
    lines.append(f"* kept (best held-out {result.metric}; epoch 0 = before fine-tuning), {n} held-out samples")
    m = result.onnx_metrics or {}
    if "accuracy" in m:
        lines.append(f"written model in onnxruntime: held-out accuracy {m['accuracy']:.4f}")
    return "\n".join(lines)

