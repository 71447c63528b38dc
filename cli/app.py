"""`onnxstack compress | inspect`: parse options, call the API, print tables, map errors to exit codes.

Exit codes: 0 success, 1 a problem with the input (one line on stderr), 2 usage errors (bad options, values
out of range or in conflict; the message names the flags).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

import onnxstack
from onnxstack.analyse import ConvInfo
from onnxstack.errors import ConfigError, ModelError, OutputError
from onnxstack.io import check_output_path, data_file_path, write_bytes_atomic
from onnxstack.load import load_model
from onnxstack.report import already_compressed, compressed_summary, format_compressed, format_table

from .common import LazyBar, UsageError, fail, handle_errors, option_error
from .options import image_options, make_image_options


class OneLineErrors(click.Group):
    """A group whose usage errors are one line and exit code 2."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(args, prog_name or "onnxstack", standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "onnxstack"
            fail(f"{e.format_message()} (see '{where} --help')", 2)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.Abort:
            fail("aborted", 1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(onnxstack.__version__, prog_name="onnxstack")
def main() -> None:
    """Compress CNNs in ONNX by stacking low-dimensional binary convolution filters."""


def default_output(model: Path) -> Path:
    name = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.stacked.onnx")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [MODEL.stacked.onnx].")
@click.option("-d", "--slice-dim", type=int, default=16, show_default=True, help="Input channels per slice.")
@click.option("-m", "--codebook-size", type=int, default=None, help="Binary codewords per layer [auto].")
@click.option("--max-codebook-size", type=int, default=256, show_default=True, help="Cap of the automatic codebook size.")
@click.option("--scale", type=click.Choice(["slice", "filter"]), default="slice", show_default=True,
              help="One float16 scale per slice or per filter.")
@click.option("-k", "--terms", type=int, default=1, show_default=True,
              help="Codewords stacked per slice (1: the paper's form; 2 halves the error for 2x index bits).")
@click.option("--execution", type=click.Choice(["auto", "speed", "dense", "lean", "stacked"]), default="auto",
              show_default=True,
              help="How compressed layers run: auto (the faster of dense and stacked per layer, then lean for the "
                   "layers with the fewest output pixels until the predicted session memory is at most the "
                   "original's), speed (the faster form per layer, more memory than the original), dense (weights "
                   "decoded once when the session starts: the original's speed), lean (decoded at every run: "
                   "the least memory, slower), stacked (binary Conv + sparse merge).")
@click.option("--skip", multiple=True, metavar="NODE", help="Conv node name to leave dense (repeatable).")
@click.option("--rest", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="What compression leaves float (layers kept dense or skipped, depthwise convs, Gemm/MatMul "
                   "weights not lifted; >= 1024 values, 2-D or more): kept float, or stored int8 per output "
                   "channel through DequantizeLinear. The report's `rest` entry lists what it stored and skipped.")
@click.option("--iterations", type=int, default=20, show_default=True, help="Codebook fitting iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Calibration data (no labels needed): .npz or a folder of images. Fits each layer to keep "
                   "the original outputs.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Calibration samples (a seeded random subset).")
@click.option("--augment", type=click.IntRange(min=1), metavar="N",
              help="With image --data: stretch the calibration set N-fold with seeded random crops, shifts and "
                   "flips (for small image sets; N x the memory).")
@click.option("--target-ratio", type=float,
              help="With --data: choose d, m, k (or int8/int4) per layer to reach this conv ratio: float32 bits / "
                   "stored bits of the weights and biases of all Conv layers, Gemm/MatMul lifted to 1x1 Convs "
                   "included, where layers kept dense or skipped count at their float32 size. It is not the file "
                   "ratio (the table's headline), which also counts every other tensor and the graph.")
@click.option("--max-drop", type=float, metavar="POINTS",
              help="With --data: the highest ratio whose top-1 drop (labels) or disagreement stays within POINTS "
                   "on a held-out quarter of the data.")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="With --data: block reconstruction after the fit (latent codebooks through sign(), per block; "
                   "each block, and the whole result, kept only if held-out outputs get closer to the original's) "
                   "[off: no block paid on the sample models; needs torch].")
@click.option("--reconstruct-steps", type=click.IntRange(min=1), metavar="S",
              help="Optimisation steps a block [500].")
@click.option("--finetune-epochs", type=click.IntRange(min=1), metavar="E",
              help="Then fine-tune E epochs by distillation from MODEL on all of --data (needs onnxstack[torch]; "
                   "`onnxstack finetune` has the options).")
@image_options
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--external-data/--no-external-data", default=None,
              help="Write large tensors to OUT.data [when the input had external data or the model is over 2 GB].")
@click.option("--inline-functions", is_flag=True,
              help="Expand the com.onnxstack functions into standard ops (for runtimes without ONNX functions).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
@handle_errors
def compress(model, output, slice_dim, codebook_size, max_codebook_size, scale, terms, execution, skip, rest, iterations,
             seed, data_path, limit, augment, target_ratio, max_drop, reconstruct, reconstruct_steps, finetune_epochs,
             image_size, channels, pixel_scale, mean, std, layout, report_path, external_data, inline_functions, overwrite,
             quiet):
    """Compress every eligible Conv of MODEL."""
    try:
        config = onnxstack.CompressConfig(
            slice_dim=slice_dim, codebook_size=codebook_size, max_codebook_size=max_codebook_size, scale=scale,
            terms=terms, execution=execution, skip=tuple(skip), iterations=iterations, seed=seed, rest=rest)
    except ConfigError as e:
        raise option_error(e) from None
    check_compress_options(data_path, target_ratio, max_drop, finetune_epochs, augment)
    refuse_compressed(model)
    output = output or default_output(model)
    source = model if model.exists() else None
    check_output_path(output, overwrite=overwrite, source=source)
    if report_path is not None:
        check_output_path(report_path, overwrite=overwrite, source=source)
        if report_path.resolve() == output.resolve():
            raise OutputError(f"{report_path}: report and model would be the same file")
    data = image_opts = None
    if data_path is not None:
        from onnxstack.data import load_data

        image_opts = make_image_options(image_size, channels, pixel_scale, mean, std, layout)
        data = load_data(data_path, model, limit=limit, seed=seed, image_options=image_opts)
        if augment is not None:
            from onnxstack.augment import augment as stretch

            data = stretch(data, augment, seed=seed, layout=layout)
    if finetune_epochs is not None:
        importlib.import_module("onnxstack.torch_bridge")  # fails in one line, before compressing, without torch
    if reconstruct_steps is not None and reconstruct:
        from onnxstack.torch_bridge.reconstruct import ReconstructConfig  # fails in one line without torch

        reconstruct = ReconstructConfig(steps=reconstruct_steps)
    result = onnxstack.compress(model, config, data=data, target_ratio=target_ratio, max_drop=max_drop,
                                progress=None if quiet else LazyBar("compressing"), reconstruct=reconstruct)
    if not quiet:
        describe_reconstruction(result.report.get("reconstruction") or {})
    if finetune_epochs is not None:
        from .finetune_cmd import finetune_after_compress

        finetune_after_compress(result, model, data_path, finetune_epochs, image_opts, seed=seed, quiet=quiet)
    written = result.save(output, overwrite=overwrite, external_data=external_data, inline_functions=inline_functions)
    describe_written_file(result.report, written)
    if report_path is not None:
        write_bytes_atomic(json.dumps(result.report, indent=2).encode(), report_path)
    if not quiet:
        click.echo(format_table(result.report))
        if data is None:
            click.echo("note: fitted without data (weights only). At these ratios that loses most of the accuracy; "
                       "pass --data with ~1,000 unlabelled inputs, and check with `onnxstack evaluate`.", err=True)
        if finetune_epochs is not None:
            click.echo("note: the SNR column was measured after calibration, before fine-tuning; "
                       "`onnxstack evaluate` measures the written file.", err=True)
        click.echo(f"wrote {output}" + (f" and {report_path}" if report_path else ""))


def describe_reconstruction(record: dict) -> None:
    """One line on what block reconstruction did."""
    if not record.get("ran"):
        if record.get("why") not in (None, "not asked for", "no calibration data"):
            click.echo(f"note: no block reconstruction: {record['why']}", err=True)
        return
    err = record["held_out_output_error"]
    verdict = "kept" if record["kept"] else "not kept (the closed-form fit was closer)"
    click.echo(f"block reconstruction: {record['totals']['kept']} of {record['totals']['blocks']} blocks trained "
               f"(held out per block), {record['totals']['seconds']:.0f} s; "
               f"held-out output error {err['closed_form']:.4f} -> {err['reconstructed']:.4f}: {verdict}", err=True)


def describe_written_file(report: dict, written: Path) -> None:
    """Sizes in the report are those of the file on disk (with its external data file, if any): the model may
    have changed since it was compressed (fine-tuning, inlined functions)."""
    size = written.stat().st_size
    data = data_file_path(written)
    if data.exists() and _uses_external_data(written):  # not a stale one left by an earlier save
        size += data.stat().st_size
    report["compressed_bytes"] = size
    report["file_ratio"] = report["original_bytes"] / size if size else None


def _uses_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def refuse_compressed(path: Path) -> None:
    """One line, before any work, for a model that onnxstack compressed already. (Only the graph is read; a file
    that cannot be read is left to compress, which says why.)"""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: compress reports it
        return
    reason = already_compressed(proto)
    if reason:
        raise ModelError(f"{path}: {reason}")


def check_compress_options(data_path, target_ratio, max_drop, finetune_epochs, augment=None) -> None:
    """Option values and combinations compress refuses before reading anything (usage errors, exit 2)."""
    if target_ratio is not None and max_drop is not None:
        raise UsageError("give --target-ratio or --max-drop, not both")
    if target_ratio is not None and not target_ratio > 1:
        raise UsageError(f"--target-ratio must be > 1, got {target_ratio:g}")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise UsageError(f"--max-drop must be in [0, 100] points, got {max_drop:g}")
    if data_path is None and (target_ratio is not None or max_drop is not None):
        raise UsageError("--target-ratio and --max-drop need calibration data: pass --data")
    if data_path is None and finetune_epochs is not None:
        raise UsageError("--finetune-epochs needs training inputs: pass --data")
    if data_path is None and augment is not None:
        raise UsageError("--augment stretches calibration data: pass --data")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-d", "--slice-dim", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def inspect(model, slice_dim, as_json):
    """List the Conv layers of MODEL, which are eligible, and why the others are not; for a compressed model,
    its StackedBinaryConv layers and the report stored in its metadata."""
    try:
        config = onnxstack.CompressConfig(slice_dim=slice_dim)
    except ConfigError as e:
        raise option_error(e) from None
    proto, _ = load_model(model)
    infos = onnxstack.inspect(proto, config)
    rows = [_inspect_row(i) for i in infos]
    compressed = compressed_summary(proto)
    if as_json:
        click.echo(json.dumps({"convs": rows, "compressed": compressed}, indent=2))
        return
    if compressed is not None:
        click.echo(format_compressed(compressed))
        if rows:
            click.echo()
    if not rows:
        click.echo("no Conv layers" + (" left dense" if compressed else ""))
        return
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("name", "shape", "group", "weight_bytes")}
    click.echo("  ".join(k.ljust(w) for k, w in widths.items()) + "  status")
    for r in rows:
        click.echo("  ".join(str(r[k]).ljust(w) for k, w in widths.items()) + "  " +
                   ("eligible" if r["eligible"] else f"skipped: {r['reason']}"))
    left = " remaining" if compressed else ""
    click.echo(f"{sum(r['eligible'] for r in rows)} of {len(rows)}{left} Conv layers eligible")


def _inspect_row(info: ConvInfo) -> dict:
    size = 4
    for v in info.shape or ():
        size *= v
    return {"name": info.name, "shape": "x".join(map(str, info.shape)) if info.shape else "?",
            "group": info.group, "weight_bytes": size if info.shape else "?", "eligible": info.eligible,
            "reason": info.reason}
