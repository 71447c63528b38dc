"""Planning one layer: codebook size, fit, execution form and stored bits.

A LayerPlan (binary-stacked) or an IntPlan (per-channel int8 / int4) holds everything the rewrite writes
for one weight tensor; fine-tuning reads a plan and writes a plan. Both answer the same questions the
rewrite, the calibration pass and the report ask: representation, bits(), original_bits(), stores_bias,
bias, execution, fitter, fallback, errors, decoded_weight().
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .analyse import ConvInfo
from .config import CompressConfig
from .core import cost, intq
from .core.fit import BinaryFit, ceil_div, slice_depth, fit_binary_codebook, from_slices, relative_error, to_slices
from .errors import ConfigError


@dataclass(frozen=True)
class LayerPlan:
    """The compressed form of one Conv weight (N, Cg, kh, kw)."""

    name: str
    weight_name: str
    shape: tuple[int, int, int, int]
    slice_dim: int
    codebook_size: int
    scale: str
    execution: str
    fit: BinaryFit
    weight_rel_error: float
    has_bias: bool  # the original layer's
    note: str | None = None
    bias: np.ndarray | None = field(default=None, repr=False, compare=False)  # new bias from calibration
    output_rel_error: float | None = None  # on calibration data: ||Y_hat - Y||^2 / ||Y - mean||^2
    fitter: str = "weights"  # the fitter that made the plan (see fitters.py)
    fallback: str | None = None  # why that fitter, when it is not the one the options asked for
    data_warning: str | None = None  # why the calibration data cannot pin this layer down (dataquality.py)
    auto_form: bool = False  # execution "auto" chose the form: the memory guard may run it lean (pipeline.py)

    def with_fit(self, fit: BinaryFit, weight_rel_error: float, bias: np.ndarray | None,
                 output_rel_error: float | None = None, fitter: str | None = None) -> "LayerPlan":
        """The same layer with another fit (and a corrected bias, which the layer then stores)."""
        return replace(self, fit=fit, weight_rel_error=weight_rel_error, bias=bias,
                       output_rel_error=output_rel_error, fitter=fitter or self.fitter)

    representation = "binary"

    @property
    def stores_bias(self) -> bool:
        return self.has_bias or self.bias is not None

    def decoded_weight(self) -> np.ndarray:
        """W_hat (N, Cg, kh, kw) float32, as the model computes with it."""
        _, cg, kh, kw = self.shape
        return from_slices(self.fit.decode(), cg, (kh, kw)).astype(np.float32)

    @property
    def slices(self) -> int:
        return self.fit.indices.shape[1]

    @property
    def terms(self) -> int:
        return self.fit.terms

    def bits(self) -> dict[str, int]:
        n, _, kh, kw = self.shape
        return cost.compressed_bits(n, self.slices, self.slice_dim, kh, kw, self.codebook_size,
                                    self.scale, self.stores_bias, self.terms)

    def original_bits(self) -> int:
        n, cg, kh, kw = self.shape
        return cost.dense_bits(n, cg, kh, kw, self.has_bias)

    def macs_per_pixel(self) -> dict[str, int]:
        n, cg, kh, kw = self.shape
        args = (n, cg, kh, kw, self.slices, self.slice_dim, self.codebook_size)
        return {"original": cost.macs_per_pixel("dense", *args), "compressed": cost.macs_per_pixel(self.execution, *args)}


@dataclass(frozen=True)
class IntPlan:
    """One Conv weight (N, Cg, kh, kw) as per-output-channel integers: W_hat[i] = scales[i] * values[i]
    (DequantizeLinear, axis 0, zero point 0), run as the original Conv (execution "dense").

    int_bits is what is stored (4 or 8); it can be less than what was asked for (int4 -> int8 below
    opset 21), and `fallback` then says so."""

    name: str
    weight_name: str
    shape: tuple[int, int, int, int]
    int_bits: int
    values: np.ndarray = field(repr=False, compare=False)  # (N, Cg, kh, kw) int8, in core.intq.qrange(int_bits)
    scales: np.ndarray = field(repr=False, compare=False)  # (N,) float32
    weight_rel_error: float
    has_bias: bool  # the original layer's
    bias: np.ndarray | None = field(default=None, repr=False, compare=False)  # new bias from calibration
    output_rel_error: float | None = None
    fitter: str = "weights"
    fallback: str | None = None
    note: str | None = None
    execution: str = "dense"

    @property
    def representation(self) -> str:
        return f"int{self.int_bits}"

    @property
    def stores_bias(self) -> bool:
        return self.has_bias or self.bias is not None

    def decoded_weight(self) -> np.ndarray:
        return intq.decode(self.values, self.scales)

    def bits(self) -> dict[str, int]:
        n, cg, kh, kw = self.shape
        return cost.int_bits(n, cg * kh * kw, self.int_bits, self.stores_bias)

    def original_bits(self) -> int:
        n, cg, kh, kw = self.shape
        return cost.dense_bits(n, cg, kh, kw, self.has_bias)

    def macs_per_pixel(self) -> dict[str, int]:
        n, cg, kh, kw = self.shape
        macs = cost.macs_per_pixel("dense", n, cg, kh, kw, 1, cg, 2)
        return {"original": macs, "compressed": macs}


def int_plan(info: ConvInfo, weight: np.ndarray, int_bits: int, values: np.ndarray, scales: np.ndarray,
             bias: np.ndarray | None = None, **extra) -> IntPlan:
    """The IntPlan of integers `values` (N, Cg, kh, kw) and `scales` (N,) for weight (N, Cg, kh, kw)."""
    w_hat = intq.decode(values, scales)
    norm = float(np.linalg.norm(weight))
    err = float(np.linalg.norm(weight - w_hat)) / norm if norm > 0 else 0.0
    return IntPlan(name=info.name, weight_name=info.weight_name, shape=tuple(weight.shape), int_bits=int_bits,
                   values=values, scales=scales.astype(np.float32), weight_rel_error=err,
                   has_bias=info.bias_name is not None, bias=bias, **extra)


def default_codebook_size(slices: int, config: CompressConfig) -> int:
    """Largest power of two <= slices / slices_per_codeword, within [2, max_codebook_size]."""
    target = max(2, slices // config.slices_per_codeword)
    m = 1 << (target.bit_length() - 1)
    return int(min(config.max_codebook_size, max(2, m), slices))


def plan_layer(info: ConvInfo, weight: np.ndarray, config: CompressConfig, *, fit: bool = True) -> LayerPlan:
    """Fit one eligible Conv weight (N, Cg, kh, kw) under the config's settings for it.

    fit=False returns the plan's settings with a placeholder fit (calibration fits it)."""
    settings = config.for_layer(info.name)
    n_out, cg, kh, kw = weight.shape
    d = slice_depth(settings.slice_dim, cg)
    slices = to_slices(weight, d)  # (N, s, D)
    n_slices = slices.shape[0] * slices.shape[1]
    m = settings.codebook_size or default_codebook_size(n_slices, config)
    if m > n_slices:
        raise ConfigError(f"codebook size m={m} exceeds the {n_slices} slices of layer '{info.name}' "
                          f"(weight {list(weight.shape)}, d={d}); use m <= {n_slices} or skip the layer")
    if fit:
        result = fit_binary_codebook(slices, m, scale=settings.scale, iterations=config.iterations, seed=config.seed,
                                     terms=settings.terms)
    else:
        k = settings.terms
        result = BinaryFit(np.ones((m, slices.shape[2]), np.int8), np.zeros((*slices.shape[:2], k), np.int64),
                           np.zeros((n_out, slices.shape[1], k), np.float32))
    form, note = settings.execution, None
    if form == "stacked" and info.group != 1:
        form, note = "dense", f"stacked form needs group=1 (group={info.group}); dense used"
    auto = form == "auto"
    if form in ("auto", "speed"):
        form = cost.choose_form(n_out, cg, kh, kw, slices.shape[1], d, m, info.group, pixels=info.pixels)
    return LayerPlan(
        name=info.name, weight_name=info.weight_name, shape=(n_out, cg, kh, kw), slice_dim=d,
        codebook_size=m, scale=settings.scale, execution=form, fit=result, auto_form=auto,
        weight_rel_error=relative_error(slices, result), has_bias=info.bias_name is not None, note=note,
    )
