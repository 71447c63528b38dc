"""The compression report: a JSON-ready dict, and the before/after table people read."""

from __future__ import annotations

import math

from .analyse import ConvInfo
from .core import cost
from .plan import IntPlan, LayerPlan

SUMMARY_KEYS = ("conv_bits_original", "conv_bits_compressed", "conv_ratio", "layers_compressed", "layers_skipped")
# what the two ratios measure (the report states it; the table's headline says it in short)
FILE_RATIO = ("the headline: bytes of the input model / bytes of the written model (its external data included), "
              "so every stored tensor counts, --rest int8 ones too")
CONV_RATIO = ("float32 bits / stored bits of the weights and biases of the main graph's Conv layers, Gemm and "
              "MatMul layers lifted to 1x1 Convs included, each stored tensor once; layers kept dense or skipped "
              "count at their float32 size (what --rest stores is not counted here, see `rest`). This is the ratio "
              "--target-ratio aims at")


def layer_entry(info: ConvInfo, plan: LayerPlan | IntPlan | None) -> dict:
    entry = {"name": info.name, "weight": info.weight_name, "shape": list(info.shape) if info.shape else None,
             "group": info.group}
    if plan is None:
        entry["skipped"] = info.reason
        if info.shape and len(info.shape) == 4:
            n, cg, kh, kw = info.shape
            entry["bits"] = cost.dense_bits(n, cg, kh, kw, info.bias_name is not None)
        return entry
    bits = plan.bits()
    entry["representation"] = plan.representation
    if isinstance(plan, IntPlan):  # per-channel integers: one float32 scale an output channel
        entry.update({"int_bits": plan.int_bits, "scale": "channel"})
    else:
        entry.update({"slice_dim": plan.slice_dim, "slices": plan.slices, "codebook_size": plan.codebook_size,
                      "terms": plan.terms, "scale": plan.scale})
    entry.update({
        "execution": plan.execution, "bits": bits["total"], "bits_by_part": bits,
        "original_bits": plan.original_bits(), "ratio": plan.original_bits() / bits["total"],
        "weight_rel_error": plan.weight_rel_error, "macs_per_pixel": plan.macs_per_pixel(), "fitter": plan.fitter,
    })
    if plan.fallback:  # fitted by something other than what the options asked for, and why
        entry["fallback"] = plan.fallback
    if getattr(plan, "data_warning", None):  # the calibration data cannot pin the layer down
        entry["data_warning"] = plan.data_warning
    if plan.output_rel_error is not None:  # calibrated: error against the original layer's outputs
        entry["output_rel_error"] = plan.output_rel_error
        entry["output_snr_db"] = float(-10 * math.log10(max(plan.output_rel_error, 1e-12)))
    if plan.note:
        entry["note"] = plan.note
    return entry


def build_report(layers: list[tuple[ConvInfo, LayerPlan | IntPlan | None]], original_bytes: int,
                 compressed_bytes: int) -> dict:
    """Totals count every stored tensor once, and every one that is stored: weights and biases shared by
    several layers once; a weight compressed twice (two layers, different settings) twice; a compressed
    weight that another node still reads, with the dense copy the file keeps; a weight that is not a
    constant, by the tensors it is computed from; skipped layers as they are."""
    entries = [layer_entry(i, p) for i, p in layers]
    before: dict = {}  # stored tensor -> bits, in the input
    after: dict = {}  # stored tensor (name, or a plan's tensors) -> bits, in the output
    for (info, plan), e in zip(layers, entries):
        if info.node_index < 0:
            continue  # inside a subgraph: not counted (left as it is)
        weight = _weight_bits(info)
        bias_bits = 0
        if info.bias_name:
            bias_bits = info.bias_bits if info.bias_bits is not None else 32 * info.shape[0] if info.shape else 0
        before.update(weight)
        if info.bias_name:
            before[info.bias_name] = bias_bits
        if plan is None:
            after.update(weight)
            if info.bias_name:
                after[info.bias_name] = bias_bits
            continue
        own_bias = plan.bias is not None  # calibration stores a new bias with the layer
        after[("plan", id(plan))] = e["bits"] - (0 if own_bias else bias_bits)
        if info.bias_name and not own_bias:
            after[info.bias_name] = bias_bits
        if info.weight_read_elsewhere:
            after.update(weight)  # the rewrite keeps the dense weight for its other readers
    conv_orig, conv_comp = sum(before.values()), sum(after.values())
    return {
        "file_ratio": original_bytes / compressed_bytes if compressed_bytes else None,
        "original_bytes": original_bytes,
        "compressed_bytes": compressed_bytes,
        "conv_ratio": conv_orig / conv_comp if conv_comp else None,
        "conv_bits_original": conv_orig,
        "conv_bits_compressed": conv_comp,
        "ratios": {"file_ratio": FILE_RATIO, "conv_ratio": CONV_RATIO},
        "layers_compressed": sum(1 for _, p in layers if p is not None),
        "layers_skipped": sum(1 for _, p in layers if p is None),
        "layers": entries,
    }


def _weight_bits(info: ConvInfo) -> dict[str, int]:
    """name -> bits of what the file stores for a layer's weight (float32 when it is a constant)."""
    if info.weight_sources:
        return dict(info.weight_sources)
    if info.shape and len(info.shape) == 4 and info.weight_name:
        n, cg, kh, kw = info.shape
        return {info.weight_name: cost.dense_bits(n, cg, kh, kw, False)}
    return {}


def format_table(report: dict) -> str:
    """The headline (file ratio, then the conv ratio and what it covers), the per-layer before/after table with
    totals, footnotes, and what --rest stored."""
    head = ["layer", "shape", "repr", "d", "m", "k", "fit", "form", "bits before", "bits after", "ratio", "SNR dB",
            "w.err"]
    rest = report.get("rest") or {}
    by_rest = {e["name"] for e in rest.get("touched", ())}
    rows = []
    for e in report["layers"]:
        shape = "x".join(map(str, e["shape"])) if e["shape"] else "?"
        if "skipped" in e:
            b = str(e.get("bits", "?"))
            why = e["skipped"] + ("; weight stored int8 by --rest (below)" if e.get("weight") in by_rest else "")
            rows.append([e["name"], shape, "float", "-", "-", "-", "-", "skipped", b, b, "1.0", "-", why])
        else:
            fit = e.get("fitter", "-") + ("*" if "fallback" in e else "")
            dmk = [str(e[k]) if k in e else "-" for k in ("slice_dim", "codebook_size", "terms")]
            rows.append([e["name"], shape, e.get("representation", "binary"), *dmk, fit, e["execution"],
                         str(e["original_bits"]), str(e["bits"]), f"{e['ratio']:.1f}",
                         f"{e['output_snr_db']:.1f}" if "output_snr_db" in e else "-", f"{e['weight_rel_error']:.3f}"])
    ratio = report["conv_ratio"]
    rows.append(["total (convs)", "", "", "", "", "", "", "", str(report["conv_bits_original"]),
                 str(report["conv_bits_compressed"]), f"{ratio:.1f}" if ratio else "-", "", ""])
    rows.append(["file (bytes)", "", "", "", "", "", "", "", str(report["original_bytes"]),
                 str(report["compressed_bytes"]),
                 f"{report['file_ratio']:.1f}" if report["file_ratio"] else "-", "", ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    lines = [headline(report)]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if r is head:
            lines.append("-" * len(lines[-1]))
    lines += [f"* {e['name']}: {e['fallback']}" for e in report["layers"] if "fallback" in e]
    lines += [f"! {e['name']}: {e['data_warning']}" for e in report["layers"] if "data_warning" in e]
    lines += rest_lines(rest)
    lines += check_lines(report.get("allocation_check"))
    lines += memory_lines(report.get("memory_guard"))
    return "\n".join(lines)


def check_lines(check: dict | None) -> list[str]:
    """The allocations the target-ratio search built and measured end to end, and which one it kept."""
    if not check:
        return []
    where = ("held-out calibration samples (the fits did not see them)" if check.get("held_out")
             else "calibration samples (the ones fitted on: too few to hold any out)")
    lines = [f"allocation check: {len(check['tried'])} allocations built and run on {check['samples']} {where}, "
             f"ranked by {check['measure']}:"]
    for t in check["tried"]:
        flips = f", argmax disagreement {t['argmax_disagreement']:.4f}" if "argmax_disagreement" in t else ""
        lines.append(f"  {'kept' if t['kept'] else '    '} {t['allocation']}: {t['conv_ratio']:.2f}x, "
                     f"output error {t['output_rel_mse']:.4g}{flips}")
    return lines


def memory_lines(guard: dict | None) -> list[str]:
    """What execution "auto" ran lean to keep the session's memory at most the original's."""
    if not guard:
        return []
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    lean = guard["lean"]
    which = (f"{len(lean)} layer{'s' if len(lean) != 1 else ''} run lean ({', '.join(lean[:4])}"
             f"{', ...' if len(lean) > 4 else ''})" if lean else "no layer needed to run lean")
    return [f"memory: {which}; predicted session memory of the compressed layers' weights {mb(guard['predicted_bytes'])}"
            f" against the original's {mb(guard['predicted_original_bytes'])} (--execution speed ignores memory; "
            "`onnxstack evaluate` measures it)"]


def headline(report: dict) -> str:
    """One line: the file ratio first, then the conv ratio (and the target, if any) and what it covers."""
    fr, cr, target = report.get("file_ratio"), report.get("conv_ratio"), report.get("target_ratio")
    file_part = (f"file ratio {fr:.1f}x ({report['original_bytes']} -> {report['compressed_bytes']} bytes)"
                 if fr else f"file ratio - ({report['original_bytes']} bytes before)")
    conv_part = f"conv ratio {cr:.1f}x" if cr else "conv ratio -"
    if target is not None:
        conv_part += f" (target {target:g}x)"
    return (f"{file_part}; {conv_part} over the Conv and lifted Gemm/MatMul weights and biases, "
            "the ratio --target-ratio aims at")


def rest_lines(rest: dict) -> list[str]:
    """What --rest int8 stored per channel, and the weights it left float with the reasons."""
    if rest.get("mode") != "int8":
        return []
    touched, skipped, small = rest["touched"], rest["skipped"], rest["small_left_float"]
    lines = [f"rest (--rest int8): {len(touched)} tensor(s) stored int8 per channel, {rest['bytes_before']} -> "
             f"{rest['bytes_after']} bytes; {len(skipped)} left float with a reason; {small['tensors']} small or 1-D "
             f"tensor(s) ({small['bytes']} bytes) stay float"]
    lines += [f"  int8   {e['name']} {'x'.join(map(str, e['shape']))} ({e['op']} '{e['consumer']}', axis {e['axis']}): "
              f"{e['bytes']} -> {e['bytes_after']} bytes, w.err {e['weight_rel_error']:.4f}" for e in touched]
    lines += [f"  float  {e['name']} {'x'.join(map(str, e['shape']))}: {e['reason']}" for e in skipped]
    return lines


def compressed_summary(model) -> dict | None:
    """What onnxstack stored in an already compressed model (a ModelProto): its StackedBinaryConv layers and
    the summary report of its metadata (`onnxstack.report`, `onnxstack.version`); None for a model without
    StackedBinaryConv nodes."""
    import json

    from onnx import numpy_helper

    from . import op

    nodes = [n for n in model.graph.node if n.op_type == op.OP_TYPE and n.domain == op.DOMAIN]
    if not nodes:
        return None
    tensors = {t.name: t for t in model.graph.initializer}
    layers = []
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        book, idx = tensors.get(n.input[1]), tensors.get(n.input[2])
        stored = [tensors[name] for name in n.input[1:] if name in tensors]
        layers.append({
            "name": n.name, "form": op.form_of(n.overload) if n.overload else "?",
            "channels": attrs["channels"].i if "channels" in attrs else None,
            "filters": int(idx.dims[0]) if idx is not None and idx.dims else None,
            "slice_dim": int(book.dims[1]) if book is not None and len(book.dims) == 4 else None,
            "codebook_size": 8 * int(book.dims[0]) if book is not None and book.dims else None,
            "terms": int(idx.dims[2]) if idx is not None and len(idx.dims) == 3 else 1,
            "stored_bytes": sum(numpy_helper.to_array(t).nbytes for t in stored)
            if all(not t.external_data for t in stored) else None,
        })
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        report = json.loads(meta["onnxstack.report"]) if "onnxstack.report" in meta else None
    except ValueError:
        report = None
    return {"version": meta.get("onnxstack.version"), "layers": layers, "report": report}


def already_compressed(model) -> str | None:
    """Why a model cannot be compressed again (one line), or None. Compressing keeps StackedBinaryConv layers
    as they are and has nothing left to do in them; the original model is the input to compress."""
    summary = compressed_summary(model)
    if summary is None:
        return None
    by = f"onnxstack {summary['version']}" if summary["version"] else "onnxstack"
    return (f"the model is already compressed by {by} ({len(summary['layers'])} StackedBinaryConv layers); "
            "compress the original model instead")


def format_compressed(summary: dict) -> str:
    """The compressed layers of a model and its stored report, as `inspect` prints them."""
    head = ["layer", "form", "channels", "filters", "d", "m", "k", "stored bytes"]
    keys = ["name", "form", "channels", "filters", "slice_dim", "codebook_size", "terms", "stored_bytes"]
    rows = [[("?" if e[k] is None else str(e[k])) for k in keys] for e in summary["layers"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    by = f" by onnxstack {summary['version']}" if summary["version"] else ""
    lines.append(f"{len(rows)} StackedBinaryConv layers (compressed{by})")
    r = summary["report"]
    if r:
        ratio = r.get("conv_ratio")
        lines.append(f"stored report (onnxstack.report): conv bits {r.get('conv_bits_original')} -> "
                     f"{r.get('conv_bits_compressed')}" + (f", ratio {ratio:.1f}x" if ratio else "") +
                     f"; {r.get('layers_compressed')} layers compressed, {r.get('layers_skipped')} skipped")
    else:
        lines.append("no stored report (metadata onnxstack.report)")
    return "\n".join(lines)
