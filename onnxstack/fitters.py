"""The fit stage: a registry of fitters, and the pass that applies them layer by layer.

A fitter turns one eligible layer into a LayerPlan. Fitters are keyed by (representation, method):

    ("binary", "weights")  the weight alone: binary k-means (core.fit), parallel over layers
    ("binary", "output")   calibration statistics of the layer's current inputs against the original
                           outputs (core.calib): GPTQ-style per-slice fit, or for per-filter scales a fit
                           to the least-squares weight plus a per-filter gain
    ("int", "weights")     per-channel int8 / int4, round to nearest with a clipping search (core.intq)
    ("int", "output")      per-channel int8 / int4, GPTQ-style on calibration statistics, gain and bias
                           corrected (core.intq)

`choose` picks the fitter for a layer from the options (data or not) and the layer; when it cannot be
the one the options ask for, it says why, and the reason travels in the plan to the report and the
table. A new fitter is one function registered here plus a line in `choose`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import calibrate
from .analyse import INT_MIN_OPSET, ConvInfo, analyse
from .config import CompressConfig, LayerOverride
from .dataquality import check_layer, warn
from .core import cost, intq
from .core.calib import LayerStats, fit_output_aware, fit_output_aware_filter, held_out_damp
from .core.fit import from_slices, one_blas_thread, relative_error, to_slices
from .normalise import default_opset
from .plan import IntPlan, LayerPlan, int_plan, plan_layer

log = logging.getLogger("onnxstack")

Key = tuple[str, str]
Plan = LayerPlan | IntPlan
INT4_MIN_OPSET = 21  # DequantizeLinear takes INT4 from opset 21


@dataclass(frozen=True)
class Job:
    """What a fitter gets for one layer."""

    info: ConvInfo
    weight: np.ndarray
    config: CompressConfig
    stats: LayerStats | None = None  # calibration statistics (output-aware fitters only)
    opset: int = INT4_MIN_OPSET  # the model's default opset (what integer widths DequantizeLinear takes)
    quiet: bool = False  # a trial fit (choosing the ridge): the data are not checked (no warning, no reason)
    # and a binary fit makes TRIAL_ROUNDS passes (it only ranks ridges; the kept fit makes all of them)


FITTERS: dict[Key, Callable[[Job], Plan]] = {}


def register(representation: str, method: str):
    def deco(fn: Callable[[Job], Plan]):
        FITTERS[representation, method] = fn
        return fn
    return deco


def needs_data(key: Key) -> bool:
    return key[1] == "output"


def choose(info: ConvInfo, config: CompressConfig, calibrated: bool,
           opset: int = INT4_MIN_OPSET) -> tuple[Key, str | None]:
    """The fitter for one eligible layer and, when it is not what the options ask for, why."""
    bits = config.for_layer(info.name).int_bits
    representation = "binary" if bits is None else "int"
    reasons = [] if bits is None else [r for r in [int_storage(bits, opset)[1]] if r]
    if not calibrated:
        return (representation, "weights"), "; ".join(reasons) or None
    if info.group != 1:
        reasons.insert(0, f"grouped conv (group={info.group}): the output-aware fit needs group=1, "
                          "so this layer is fitted to its weights only")
        return (representation, "weights"), "; ".join(reasons)
    return (representation, "output"), "; ".join(reasons) or None


def int_storage(bits: int, opset: int) -> tuple[int, str | None]:
    """The integer width a layer asking for `bits` is stored at under `opset`, and why when it differs."""
    if bits == 4 and opset < INT4_MIN_OPSET:
        return 8, f"int4 needs opset >= {INT4_MIN_OPSET} (model has {opset}); stored as int8"
    return bits, None


def int_candidate(info: ConvInfo, weight: np.ndarray, bias: np.ndarray | None, stats: LayerStats, bits: int,
                  opset: int, damp: float = 0.01, held: LayerStats | None = None) -> tuple[int, float]:
    """(bits stored, damage) of one layer as int8 / int4 (`bits`) under `opset`, as the ("int", "output")
    fitter would make it from `stats`, without building a plan: damage = relative_error(W_hat, b_hat) on
    `held` (or on `stats` when not given), the relative output error against the original outputs (as
    search.layer_candidates measures binary candidates). The bits count the corrected bias the calibrated
    layer stores."""
    stored, _ = int_storage(bits, opset)
    n = weight.shape[0]
    q, scales, new_bias = intq.quantize_output_aware(weight, stats, stored, damp)
    damage = (stats if held is None else held).relative_error(intq.decode(q, scales).reshape(n, -1), new_bias)
    return cost.int_bits(n, int(np.prod(weight.shape[1:])), stored, True)["total"], damage


TRIAL_ROUNDS = 1


GROUPED_BINARY = ((16, 1), (256, 1), (256, 2))  # (m, k) of a grouped conv's binary candidates, at d = 1


def grouped_int(model: onnx.ModelProto, infos: list[ConvInfo], config: CompressConfig,
                opset: int) -> dict[str, list[tuple[int, float, str, int, int, int]]]:
    """name -> [(bits, relative weight error, "int8" / "int4" / "binary", d, m, k)] of the search candidates
    (search.layer_candidates_all) of each grouped or depthwise conv the user left alone: int8 per output
    channel, and int4 where the opset has it, rounded to nearest from its weights (the output-aware fits
    need group=1); and binary at slice depth 1 (a slice is one channel's kh x kw kernel) for the
    GROUPED_BINARY codebooks and terms, fitted to the weights. Kept float, EfficientNet-Lite0's 16
    depthwise convs hold 4 % of its weights and take 66 % of the bit budget of a 16x target; int8 stores
    them (with their float biases) in a third of that, at relative weight errors below 1e-4; int4 saves a
    quarter more (a 3x3 filter's scale and bias weigh as much as its weights) and lets a tight budget
    (above 32x there) be met at all; binary (an 8-bit index and a 16-bit scale a 5x5 kernel, against
    int4's 100 bits and 32-bit scale) lets 80x and 100x be met. Empty below the opset DequantizeLinear needs."""
    names = [i.name for i in infos if i.group != 1 and i.shape and len(i.shape) == 4 and i.name not in config.overrides]
    if opset < INT_MIN_OPSET or not names:
        return {}
    as_int = replace(config, overrides={**config.overrides, **{n: LayerOverride(representation="int8") for n in names}})
    weights = {t.name: t for t in model.graph.initializer}
    widths = (8, 4) if opset >= INT4_MIN_OPSET else (8,)
    out = {}
    for info in analyse(model, as_int):
        if info.name not in names or not info.eligible:
            continue
        w = numpy_helper.to_array(weights[info.weight_name])
        norm = max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)
        out[info.name] = []
        for bits in widths:
            q, scales = intq.quantize_weights(w, bits)
            error = float(np.sum((intq.decode(q, scales) - w) ** 2) / norm)
            stored = cost.int_bits(w.shape[0], int(np.prod(w.shape[1:])), bits, info.bias_name is not None)["total"]
            out[info.name].append((stored, error, f"int{bits}", 0, 0, 0))
        n, cg, kh, kw = w.shape
        for m, k in GROUPED_BINARY if kh * kw >= 4 else ():  # 1x1: a 1-weight slice has 2 codewords
            if m > min(n * cg // 2, 1 << (kh * kw)):
                continue
            one = replace(as_int, overrides={**as_int.overrides, info.name: LayerOverride(slice_dim=1, codebook_size=m,
                                                                                      terms=k)})
            plan = plan_layer(info, w, one)
            error = plan.weight_rel_error ** 2  # squared, as the integer candidates' above
            stored = cost.compressed_bits(n, cg, 1, kh, kw, m, plan.scale, info.bias_name is not None, k)["total"]
            out[info.name].append((stored, error, "binary", 1, m, k))
    return out


@register("binary", "weights")
def fit_weights(job: Job) -> LayerPlan:
    return plan_layer(job.info, job.weight, job.config)


@register("binary", "output")
def fit_output(job: Job) -> LayerPlan:
    info, w, config = job.info, job.weight, job.config
    base = plan_layer(info, w, config, fit=False)
    d, m, k = base.slice_dim, base.codebook_size, base.terms
    if config.for_layer(info.name).scale == "filter":
        fit, bias = fit_output_aware_filter(w, job.stats, d, m, terms=k, damp=config.calibration_damp,
                                            iterations=config.iterations, seed=config.seed)
    else:
        fit, bias = fit_output_aware(w, job.stats, d, m, terms=k, damp=config.calibration_damp,
                                     iterations=config.iterations, seed=config.seed,
                                     rounds=TRIAL_ROUNDS if job.quiet else 3)
    w_hat = from_slices(fit.decode(), info.shape[1], info.shape[2:]).reshape(info.shape[0], -1)
    if not job.quiet:  # a trial's plan is thrown away: its check (an eigen-solve and ranks) would be wasted
        check = check_layer(job.stats, d, info.shape[2:], name=info.name)
        warn(check)  # logged when the data cannot pin the layer down; the reason goes into the report
        if check.reason:
            base = replace(base, data_warning=check.reason)
    return base.with_fit(fit, relative_error(to_slices(w, d), fit), bias,
                         output_rel_error=job.stats.relative_error(w_hat, bias), fitter="output")


@register("int", "weights")
def fit_int_weights(job: Job) -> IntPlan:
    bits, _ = int_storage(job.config.for_layer(job.info.name).int_bits, job.opset)
    q, scales = intq.quantize_weights(job.weight, bits)
    return int_plan(job.info, job.weight, bits, q, scales)


@register("int", "output")
def fit_int_output(job: Job) -> IntPlan:
    bits, _ = int_storage(job.config.for_layer(job.info.name).int_bits, job.opset)
    q, scales, bias = intq.quantize_output_aware(job.weight, job.stats, bits, job.config.calibration_damp)
    n = job.weight.shape[0]
    return int_plan(job.info, job.weight, bits, q, scales, bias, fitter="output",
                    output_rel_error=job.stats.relative_error(intq.decode(q, scales).reshape(n, -1), bias))


def fit_layers(model: onnx.ModelProto, infos: list[ConvInfo], feeds, config: CompressConfig,
               progress: Callable[[str], None] | None = None) -> dict[int, Plan]:
    """node index -> LayerPlan for every eligible Conv. Without data (feeds None): weights-only fits in
    parallel. With data (a dict of arrays, or a Dataset read a batch at a time): graph order, each layer on
    the inputs of the model compressed so far (one walk, calibrate.py)."""
    if feeds is None:
        return _weights_only(model, infos, config, progress)
    tensors = {t.name: t for t in model.graph.initializer}  # read a layer at a time (ResNet-50: 100 MB at once)
    todo = [i for i in infos if i.eligible]
    opset = default_opset(model)
    chosen = {i.node_index: choose(i, config, calibrated=True, opset=opset) for i in todo}
    plans: dict[int, Plan] = {}
    done: dict[tuple, Plan] = {}  # (weight, settings) -> plan: layers sharing a weight share a fit

    def needs(info):  # asked as the walk reaches the layer: a shared fit is measured at its first user only
        return needs_data(chosen[info.node_index][0]) and (info.weight_name, config.for_layer(info.name)) not in done

    with calibrate.Walk(model, todo, feeds, config, sequential=True, needs=needs, held_out=True) as walk:
        for info, stats in walk:
            key = (info.weight_name, config.for_layer(info.name))
            if key in done:
                plan = done[key]
            else:
                fitter, reason = chosen[info.node_index]
                layer_config, ridge, weight = config, None, numpy_helper.to_array(tensors[info.weight_name])
                if isinstance(stats, tuple):  # the held-out rows choose the ridge, then every row is fitted
                    fit, held = stats
                    damp = held_out_damp(_trial(fitter, info, weight, config, fit, opset),
                                         fit, held, config.calibration_damp)
                    stats = fit.absorb(held)  # every row, in fit's arrays
                    del fit, held
                    if damp != config.calibration_damp:
                        ridge = (f"ridge {damp:g} (not {config.calibration_damp:g}), chosen on held-out rows: "
                                 f"{stats.n} calibration rows for {stats.sxx.shape[0]} weights a filter")
                        log.info("%s: %s", info.name, ridge)
                        layer_config = replace(config, calibration_damp=damp)
                plan = FITTERS[fitter](Job(info, weight, layer_config, stats, opset))
                if ridge:
                    plan = replace(plan, note="; ".join(filter(None, [plan.note, ridge])))
                if reason:
                    plan = _with_fallback(plan, reason)
            done[key] = plans[info.node_index] = plan
            walk.install(info, plan)
            if progress:
                progress(info.name)
    return plans


def _trial(fitter: str, info: ConvInfo, weight: np.ndarray, config: CompressConfig, stats: LayerStats, opset: int):
    """damp -> (W_hat (N, K), b_hat): the layer as `fitter` fits it on `stats` under that ridge (quietly)."""
    def fit_at(damp: float):
        plan = FITTERS[fitter](Job(info, weight, replace(config, calibration_damp=damp), stats, opset, quiet=True))
        bias = plan.bias if plan.bias is not None else np.zeros(weight.shape[0], np.float32)
        return plan.decoded_weight().reshape(weight.shape[0], -1), bias
    return fit_at


def _with_fallback(plan: Plan, reason: str) -> Plan:
    from dataclasses import replace

    return replace(plan, fallback=reason)


def _weights_only(model, infos, config, progress) -> dict[int, Plan]:
    """Weights-only plans, layers in parallel threads (largest first; numpy releases the GIL in the
    products that dominate a fit, each of which keeps BLAS to one thread). Layers sharing a weight and
    settings share one fit. The result does not depend on the number of workers."""
    weights = {t.name: t for t in model.graph.initializer}
    users: dict[tuple, list[ConvInfo]] = {}  # (weight, settings) -> the layers that share one fit
    for info in infos:
        if info.eligible:
            users.setdefault((info.weight_name, config.for_layer(info.name)), []).append(info)
    order = sorted(users, key=lambda key: -int(np.prod(weights[key[0]].dims, dtype=np.int64)))
    workers = min(_cpu_count(), len(order)) or 1
    opset = default_opset(model)

    def fit(key):
        info = users[key][0]
        fitter, reason = choose(info, config, calibrated=False, opset=opset)
        plan = FITTERS[fitter](Job(info, numpy_helper.to_array(weights[key[0]]), config, opset=opset))
        return _with_fallback(plan, reason) if reason else plan

    by_node: dict[int, Plan] = {}
    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fit, key): key for key in order}
        for future in as_completed(futures):
            plan = future.result()
            for info in users[futures[future]]:
                by_node[info.node_index] = plan
                if progress:
                    progress(info.name)
    return by_node


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
