"""The compression report: a JSON-ready dict, and the before/after table people read."""

from __future__ import annotations

import math

from .analyse import ConvInfo
from .core import cost
from .plan import IntPlan, LayerPlan

SUMMARY_KEYS = ("conv_bits_original", "conv_bits_compressed", "conv_ratio", "layers_compressed", "layers_skipped")


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
    if plan.output_rel_error is not None:  # calibrated: error against the original layer's outputs
        entry["output_rel_error"] = plan.output_rel_error
        entry["output_snr_db"] = float(-10 * math.log10(max(plan.output_rel_error, 1e-12)))
    if plan.note:
        entry["note"] = plan.note
    return entry


def build_report(layers: list[tuple[ConvInfo, LayerPlan | IntPlan | None]], original_bytes: int, compressed_bytes: int) -> dict:
    """Totals count each stored tensor once (weights and biases may be shared), skipped layers dense."""
    entries = [layer_entry(i, p) for i, p in layers]
    tensors: dict[str, tuple[int, int]] = {}  # name -> (bits before, bits after)
    for (info, plan), e in zip(layers, entries):
        if "bits" not in e:
            continue
        if plan is not None and plan.bias is not None:  # calibration stores a new bias with the layer
            tensors[info.weight_name] = (plan.original_bits(), e["bits"])
            continue
        bias_bits = 32 * info.shape[0] if info.bias_name else 0
        if info.bias_name:
            tensors[info.bias_name] = (bias_bits, bias_bits)
        before = (plan.original_bits() if plan else e["bits"]) - bias_bits
        tensors[info.weight_name] = (before, e["bits"] - bias_bits)
    conv_orig = sum(b for b, _ in tensors.values())
    conv_comp = sum(a for _, a in tensors.values())
    return {
        "original_bytes": original_bytes,
        "compressed_bytes": compressed_bytes,
        "file_ratio": original_bytes / compressed_bytes if compressed_bytes else None,
        "conv_bits_original": conv_orig,
        "conv_bits_compressed": conv_comp,
        "conv_ratio": conv_orig / conv_comp if conv_comp else None,
        "layers_compressed": sum(1 for _, p in layers if p is not None),
        "layers_skipped": sum(1 for _, p in layers if p is None),
        "layers": entries,
    }


def format_table(report: dict) -> str:
    """Per-layer before/after table with totals."""
    head = ["layer", "shape", "repr", "d", "m", "k", "fit", "form", "bits before", "bits after", "ratio", "SNR dB",
            "w.err"]
    rows = []
    for e in report["layers"]:
        shape = "x".join(map(str, e["shape"])) if e["shape"] else "?"
        if "skipped" in e:
            b = str(e.get("bits", "?"))
            rows.append([e["name"], shape, "float", "-", "-", "-", "-", "skipped", b, b, "1.0", "-", e["skipped"]])
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
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if r is head:
            lines.append("-" * len(lines[0]))
    lines += [f"* {e['name']}: {e['fallback']}" for e in report["layers"] if "fallback" in e]
    return "\n".join(lines)
