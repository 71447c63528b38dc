"""Honest bit accounting and the MAC cost model, in one place.

Stored bits of a compressed layer (N filters, s slices of d x kh x kw, m codewords, k terms a slice):
  codebook  8 * ceil(m/8) * d*kh*kw    (packed; padding codewords are stored, so counted)
  indices   N * s * k * 8 * itemsize     (uint8 up to m = 256, else uint16)
  scales    16 * N * s * k (per slice) or 16 * N * k (per filter)
  bias      32 * N when present
Stored bits of an integer layer (per-channel int8 / int4 weights through DequantizeLinear, zero point 0,
not stored):
  weights   bits * N * K               (K = Cg*kh*kw; int4 packs two a byte: 8 * ceil(N*K/2))
  scales    32 * N                     (float32, which DequantizeLinear takes at every opset >= 13)
  bias      32 * N when present
MACs per output pixel:
  dense     N * Cg * kh * kw                         (same as the original Conv; lean too)
  stacked   s * M' * d * kh * kw  +  N * s * M'       (M' = 8 * ceil(m/8) codewords)
"""

from __future__ import annotations

from .bits import index_dtype, packed_rows


# Fixed cost of one stacked layer call (its extra nodes and the s*m intermediate maps they pass along), in
# multiply-adds: the smallest layers of bench/inference_speed.py's cost-model check (1 thread, batch 1)
# ran 0.95-1.1x faster stacked where MACs alone predicted 1.4-3.3x; 5e5 accounts for that gap.
STACKED_OVERHEAD_MACS = 500_000


def dense_bits(n_out: int, channels: int, kh: int, kw: int, has_bias: bool) -> int:
    """float32 weight (+ bias) bits."""
    return 32 * (n_out * channels * kh * kw + (n_out if has_bias else 0))


def compressed_bits(n_out: int, slices: int, d: int, kh: int, kw: int, m: int, scale: str,
                    has_bias: bool, terms: int = 1) -> dict[str, int]:
    """Every stored bit of one compressed layer, by part, plus the total."""
    parts = {
        "codebook": 8 * packed_rows(m) * d * kh * kw,
        "indices": n_out * slices * terms * 8 * index_dtype(m).itemsize,
        "scales": 16 * n_out * (slices if scale == "slice" else 1) * terms,
        "bias": 32 * n_out if has_bias else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def int_bits(n_out: int, k: int, bits: int, has_bias: bool) -> dict[str, int]:
    """Every stored bit of one integer layer (N output channels, K weights each), by part, plus the total."""
    count = n_out * k
    parts = {
        "weights": 8 * ((count + 1) // 2) if bits == 4 else 8 * count,
        "scales": 32 * n_out,
        "bias": 32 * n_out if has_bias else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def macs_per_pixel(form: str, n_out: int, channels: int, kh: int, kw: int, slices: int, d: int, m: int) -> int:
    """Multiply-accumulates per output pixel of one layer in the given execution form."""
    if form in ("dense", "lean"):  # lean decodes the weight at every run on top (N*Cg*kh*kw writes a call)
        return n_out * channels * kh * kw
    if form == "stacked":
        mp = 8 * packed_rows(m)
        return slices * mp * d * kh * kw + n_out * slices * mp
    raise ValueError(f"unknown form {form!r}")


def layer_macs(form: str, n_out: int, channels: int, kh: int, kw: int, slices: int, d: int, m: int,
               pixels: int) -> int:
    """Multiply-accumulates of one layer call on `pixels` output pixels, the stacked form's fixed cost included."""
    fixed = STACKED_OVERHEAD_MACS if form == "stacked" else 0
    return macs_per_pixel(form, n_out, channels, kh, kw, slices, d, m) * pixels + fixed


def choose_form(n_out: int, channels: int, kh: int, kw: int, slices: int, d: int, m: int, group: int,
                margin: float = 1.25, pixels: int | None = None) -> str:
    """'stacked' where it needs `margin` times fewer MACs than dense, else 'dense'.

    pixels: output pixels an image, where known; the stacked form's extra nodes then cost
    STACKED_OVERHEAD_MACS a call on top (it decides small layers: 7x7 or 14x14 maps of a few channels)."""
    if group != 1:
        return "dense"
    args = (n_out, channels, kh, kw, slices, d, m)
    if pixels:
        dense, stacked = layer_macs("dense", *args, pixels), layer_macs("stacked", *args, pixels)
    else:
        dense, stacked = macs_per_pixel("dense", *args), macs_per_pixel("stacked", *args)
    return "stacked" if stacked * margin < dense else "dense"


# Session memory in onnxruntime (1.32, CPU, default options), in bytes a float32 weight byte, measured by
# bench/fold_memory.py and bench/inference_speed.py: an original Conv's weight costs about 3 (the file's
# copy and the reordered copy its kernel runs on), an original Gemm's 1.3; the dense form folds the decode
# at session start and keeps each folded tensor until the session is built: 1.2-1.45x a Conv's cost
# (1.5 is taken), about 3x a Gemm's when a fully connected layer was lifted to a 1x1 Conv (its weight then
# also gets the Conv's reordered copy). The lean form holds only the packed tensors and decodes one layer
# at a time: its peak is about 4 weight copies of the largest layer it decodes.
MEMORY_ORIGINAL = {"conv": 3.0, "fc": 1.3}
MEMORY_DENSE = {"conv": 4.5, "fc": 3.9}
MEMORY_LEAN_PEAK = 4.0


def memory_plan(layers: list[tuple[int, int | None, str, int]]) -> tuple[set[int], dict]:
    """Which layers to run lean so that the predicted session memory stays at or under the original's.

    layers: (weight bytes as float32, output pixels an image or None, form, folded bytes) a layer; form is
    "dense" (the cost model's choice: may be turned lean), "fixed" (dense because the user said so),
    "stacked" or "lean"; folded bytes: what the form folds into a float tensor at session start (the weight
    for dense and fixed, the (N, s*M') merge matrix for stacked, 0 for lean). A layer of 1 output pixel is
    a fully connected one. Layers go lean fewest pixels first (the decode at every run and onnxruntime's
    Conv on a non-constant weight cost least there), the larger first among equals, until the prediction
    fits. Returns (indices to run lean, {"original", "predicted"} bytes predicted for the compressed
    layers' weights, the lean ones chosen included)."""
    kind = ["fc" if px == 1 else "conv" for _, px, _, _ in layers]
    original = sum(MEMORY_ORIGINAL[k] * row[0] for row, k in zip(layers, kind))

    def predicted(lean: set[int]) -> float:
        held = sum(MEMORY_DENSE[k] * folded for i, ((_, _, f, folded), k) in enumerate(zip(layers, kind))
                   if i not in lean and f != "lean")
        peak = max([b for i, (b, _, f, _) in enumerate(layers) if i in lean or f == "lean"], default=0)
        return held + MEMORY_LEAN_PEAK * peak

    lean: set[int] = set()
    order = sorted((i for i, row in enumerate(layers) if row[2] == "dense"),
                   key=lambda i: (layers[i][1] or 1 << 30, -layers[i][0]))
    best = (predicted(lean), set(lean))
    for i in order:
        if best[0] <= original:
            break
        lean.add(i)
        p = predicted(lean)
        if p < best[0]:
            best = (p, set(lean))
    return best[1], {"original": int(original), "predicted": int(best[0])}
