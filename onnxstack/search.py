"""Choosing the settings of every layer: one module for the whole search.

Two questions, one machinery:
- `--target-ratio R`: each eligible layer is fitted on calibration data under a grid of (d, m, k)
  candidates; a candidate's damage is its relative output error on the original inputs,

      damage = || X (W_hat - W) + (b_hat - b) ||^2 / || X W - mean ||^2     (sampled positions),

  and its cost the bits it stores. The allocation minimises the summed damage under the bit budget that
  the target conv ratio leaves, by Lagrangian relaxation: each layer takes argmin damage + lambda * bits,
  and lambda is bisected until the budget holds. Layers differ a lot in how much they tolerate, so the
  bits go where they buy the most.
- `--max-drop P`: bisection over RATIO_GRID for the highest target ratio whose top-1 drop on a held-out
  quarter of the data stays within P points; each try runs the fit and rewrite stages it is handed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .analyse import INT_MIN_OPSET, ConvInfo, analyse
from .calibrate import Walk, install_weights
from .config import CompressConfig, LayerOverride
from .core import allocation, cost
from .core.calib import LayerStats, OutputMetric, fit_output_aware, fit_output_aware_filter
from .core.fit import ceil_div, from_slices
from .errors import ConfigError, OnnxstackError
from .fitters import grouped_int, int_candidate, int_storage
from .normalise import default_opset
from .runtime import predict_top1

log = logging.getLogger("onnxstack")

SLICE_DIMS = (1, 2, 4, 8, 16, 32, 64)
TOP_SLICE_DIMS = (128, 256)  # and the layer's channels: only for rungs beyond those SLICE_DIMS reach (100x)
TERMS = (1, 2, 3, 4)
CODEBOOK_SIZES = (16, 64, 256, 1024, 4096)
RUNGS = tuple(2.0 ** (k / 2) for k in range(2, 19))  # conv ratios 2x ... 512x, sqrt(2) apart
PER_RUNG = 2  # candidates kept per rung and layer
MAX_CODEBOOK_BYTES = 64 << 20  # the codebook update's (m, D, D) float64 metric
MAX_FIT_MACS = 4e9  # multiply-adds of one candidate's fit (weights x codewords x terms)
REFERENCE_RATIO = 32  # the candidate whose end-to-end damage measures a layer's sensitivity
SENSITIVITY_SAMPLES = 64
DOMINANT_SHARE = 0.25  # a layer whose chosen setting takes this share of the budget has its other
MAX_ALTERNATIVES = 3  # representations built and measured end to end (at most this many allocations more)
TARGET_TOLERANCE = 1.15  # a target ratio lands within 15% (above it only where nothing nearer fits)


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer; slice_dim 0 means: keep it dense.

    damage: the layer's relative output error on the original inputs, times the layer's sensitivity (how
    much the model's outputs move per unit of it, measured end to end; see `sensitivities`)."""

    slice_dim: int
    codebook_size: int
    terms: int
    bits: int
    damage: float
    representation: str = "binary"  # "binary", "int8", "int4" or "float" (kept dense)
    scale: str = "slice"  # a binary candidate's scale mode

    @property
    def dense(self) -> bool:
        return self.representation == "float"


def candidate_grid(info: ConvInfo, config: CompressConfig) -> list[tuple[int, int, int, str]]:
    """(d, m, k, scale mode) worth trying for one layer: a ladder of stored sizes with no holes.

    Every (d, k) with d up to the layer's channels and k up to 4 terms, each with the codebook size of the
    config's rule (slices / slices_per_codeword, a power of two) and, where the index stays a byte or the
    codewords are short, the next sizes up to 4096 (uint16 indices); then per rung of conv ratio (sqrt(2)
    apart) the PER_RUNG candidates that spend the most bits on the codebook and indices rather than scales
    (the terms and codewords that carry information), at the config's scale mode; and per rung the most
    informative one with the other mode (a float16 scale a 16-weight slice is a bit a weight: per-filter
    scales spend it on terms, which pays on wide 1x1 convs and FC layers). TOP_SLICE_DIMS and a whole
    filter a slice only extend the ladder past the highest rung the others reach, and the cheapest setting
    of all is always tried (how far the layer can go). Cost of the search: about that many fits a layer."""
    n, cg, kh, kw = info.shape
    has_bias = True  # calibration stores a corrected bias
    dense = cost.dense_bits(n, cg, kh, kw, has_bias)
    fixed = config.overrides.get(info.name, LayerOverride()).scale  # a user's scale mode is the only one tried
    rungs, others, mode = {}, {}, fixed or config.scale  # rung -> [(share of useful bits, d, (d, m, k, scale))]
    modes = ((mode, rungs),) if fixed else ((mode, rungs), ("filter" if mode == "slice" else "slice", others))
    top, cheapest = None, (np.inf, None)  # the highest rung of SLICE_DIMS; the fewest bits of all
    wide = tuple(sorted({*TOP_SLICE_DIMS, cg} - set(SLICE_DIMS)))  # a whole filter a slice is the widest
    for d in SLICE_DIMS + wide:
        if d > cg:
            continue
        top = max(rungs, default=-1) if d in wide and top is None else top
        D, slices = d * kh * kw, n * ceil_div(cg, d)
        sizes = [m for m in CODEBOOK_SIZES if 2 <= m <= max(2, slices // 2) and m <= 1 << D
                 and m * D * D * 8 <= MAX_CODEBOOK_BYTES]
        for m in sizes:
            for k in TERMS:
                if m != sizes[0] and n * cg * kh * kw * m * k > MAX_FIT_MACS:
                    continue
                for scale, into in modes:
                    bits = cost.compressed_bits(n, ceil_div(cg, d), d, kh, kw, m, scale, has_bias, k)
                    ratio = dense / bits["total"]
                    if ratio < 1.5:
                        continue
                    cheapest = min(cheapest, (bits["total"], (d, m, k, scale)))
                    rung = int(np.argmin([abs(np.log(ratio / r)) for r in RUNGS]))
                    if d in wide and rung <= top:
                        continue
                    useful = (bits["codebook"] + bits["indices"]) / bits["total"]
                    into.setdefault(rung, []).append((useful, d, (d, m, k, scale)))
    grid = []
    for rung in sorted(rungs):  # per rung: the most informative candidate, and the one with the longest slices
        options = rungs[rung]
        picks = [max(options)[2], max(options, key=lambda o: (o[1], o[0]))[2]]
        grid += list(dict.fromkeys(picks))[:PER_RUNG]
    grid += [max(others[rung])[2] for rung in sorted(others)]
    return grid + [cheapest[1]] if cheapest[1] and cheapest[1] not in grid else grid  # the ladder's top


def layer_candidates(info: ConvInfo, weight: np.ndarray, bias: np.ndarray | None, stats: LayerStats,
                     config: CompressConfig, opset: int, held: LayerStats | None = None) -> tuple[list[Candidate], dict]:
    """The layer's candidates with their (layer-local) damage, and the decoded weight and bias of the one
    nearest REFERENCE_RATIO (to measure the layer's end-to-end sensitivity with). Each candidate is fitted on
    `stats`; its damage is measured on `held` (rows of samples the fit did not see) when given: in-sample
    damage flatters a layer with fewer rows than weights (a classifier's FC on a few hundred images), and
    the allocation would then spend the fewest bits on the layer that generalises worst.

    Candidates: the binary ladder, int8 and (where the opset has INT4 DequantizeLinear) int4 per channel,
    and float. A representation the user fixed for the layer (a LayerOverride) is the only one tried."""
    out = []
    n, cg, kh, kw = weight.shape
    dense_bits = cost.dense_bits(n, cg, kh, kw, bias is not None)
    fixed = config.overrides.get(info.name, LayerOverride()).representation
    layer_scale = config.for_layer(info.name).scale  # the sensitivity is measured at it
    metrics, ref = {}, None
    for int_bits in (8, 4) if opset >= INT_MIN_OPSET else ():  # below: the fit would leave the layer dense
        if fixed in (None, f"int{int_bits}") and int_storage(int_bits, opset)[0] == int_bits:
            bits, harm = int_candidate(info, weight, bias, stats, int_bits, opset, config.calibration_damp, held)
            out.append(Candidate(0, 0, 0, bits, harm, f"int{int_bits}"))
    for d, m, k, scale in (candidate_grid(info, config) if fixed in (None, "binary") else []):
        if d not in metrics and scale == "slice":
            metrics[d] = OutputMetric.build(stats, n, cg, d, (kh, kw), config.calibration_damp, prior=weight)
        if scale == "filter":
            fit, new_bias = fit_output_aware_filter(weight, stats, d, m, terms=k, damp=config.calibration_damp,
                                                    iterations=min(config.iterations, 8), seed=config.seed)
        else:
            fit, new_bias = fit_output_aware(weight, stats, d, m, terms=k, iterations=min(config.iterations, 8),
                                             seed=config.seed, rounds=1, metric=metrics[d])
        bits = cost.compressed_bits(n, ceil_div(cg, d), d, kh, kw, m, scale, True, k)["total"]
        decoded = from_slices(fit.decode(), cg, (kh, kw))  # its output error on the held-out rows (else in-sample)
        out.append(Candidate(d, m, k, bits, (stats if held is None else held).relative_error(decoded.reshape(n, -1),
                                                                                            new_bias), scale=scale))
        distance = abs(np.log(dense_bits / bits / REFERENCE_RATIO))
        if out[-1].damage > 0 and scale == layer_scale and (ref is None or distance < ref[0]):
            ref = (distance, out[-1], decoded, new_bias)
    out.append(Candidate(0, 0, 0, dense_bits, 0.0, "float"))
    return out, ({"candidate": ref[1], "weight": ref[2], "bias": ref[3]} if ref else {})


def sensitivities(model: onnx.ModelProto, infos: dict[str, ConvInfo], refs: dict[str, dict],
                  feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Per layer: how much the model's outputs move (relative squared error, summed over the outputs, on
    up to SENSITIVITY_SAMPLES samples) when that layer alone takes its reference candidate, divided by
    that candidate's layer-local damage. Layers whose errors the rest of the network amplifies (often
    the first and the last) get large values, so the allocation gives them more bits."""
    from .runtime import open_session

    n = min(SENSITIVITY_SAMPLES, len(next(iter(feeds.values()))))
    part = {k: v[:n] for k, v in feeds.items()}
    reference = open_session(model).run(None, part)
    out = {}
    for name, ref in refs.items():
        info = infos[name]
        work = onnx.ModelProto()
        work.CopyFrom(model)
        install_weights(work, info.node_index, ref["weight"], ref["bias"], tag="__probe")
        moved = open_session(work).run(None, part)
        err = sum(float(np.sum((a - b) ** 2) / max(np.sum((b - b.mean()) ** 2), 1e-30))
                  for a, b in zip(moved, reference) if np.issubdtype(b.dtype, np.floating))
        out[name] = err / ref["candidate"].damage
    return out


def allocate(candidates: dict[str, list[Candidate]], budget_bits: float,
             low_bits: float | None = None) -> dict[str, Candidate]:
    """The choice per layer that minimises summed damage within the bit budget (core.allocation); with
    `low_bits`, one that spends at least that many where the relaxation's answer spends fewer and an
    allocation between the two exists (a target ratio then lands within TARGET_TOLERANCE)."""
    cheapest = sum(min(x.bits for x in c) for c in candidates.values())
    if cheapest > budget_bits:
        raise ConfigError(f"the target ratio needs {budget_bits:.0f} bits for the compressed layers, but their "
                          f"smallest settings take {cheapest}; lower the target")
    choice = allocation.lagrangian(candidates, budget_bits)
    if low_bits is not None and sum(c.bits for c in choice.values()) < low_bits:
        choice = allocation.in_window(candidates, low_bits, budget_bits) or choice
    return choice


def overrides_for(choice: dict[str, Candidate], config: CompressConfig) -> CompressConfig:
    """The config with the chosen (d, m) of every layer as per-layer overrides."""
    ov = dict(config.overrides)
    for name, c in choice.items():
        old = ov.get(name, LayerOverride())
        if c.dense:
            ov[name] = LayerOverride(skip=True, reason="kept dense by the target-ratio allocation")
        elif c.representation != "binary":
            ov[name] = LayerOverride(representation=c.representation, execution=old.execution, skip=old.skip,
                                     reason=old.reason)
        else:
            ov[name] = LayerOverride(slice_dim=c.slice_dim, codebook_size=c.codebook_size, terms=c.terms,
                                     execution=old.execution, skip=old.skip, reason=old.reason,
                                     representation=old.representation,
                                     scale=None if c.scale == config.scale else c.scale)
    return replace(config, overrides=ov)


@dataclass
class Candidates:
    """Every eligible layer's (d, m, k) candidates with their damage, and the bits the convs take."""

    per_layer: dict
    fixed_bits: int  # layers that stay as they are
    total_bits: int  # all conv weights and biases, dense
    sensitivity: dict = field(default_factory=dict)  # layer -> end-to-end output error per unit of its own

    @property
    def max_ratio(self) -> float:
        """The highest conv ratio the candidates reach (every layer at its smallest setting)."""
        return self.total_bits / (self.fixed_bits + sum(min(c.bits for c in cs) for cs in self.per_layer.values()))

    def budget(self, target_ratio: float) -> float:
        budget = self.total_bits / target_ratio - self.fixed_bits
        if budget <= 0:
            raise ConfigError(f"target ratio {target_ratio:g} is out of reach: the layers left dense alone "
                              f"take {self.fixed_bits} of the {self.total_bits / target_ratio:.0f} bits it allows")
        return budget

    def settings(self, config: CompressConfig, target_ratio: float) -> tuple[CompressConfig, dict]:
        """Per-layer overrides reaching `target_ratio` with the least summed damage, and the choice table."""
        return self.apply(config, allocate(self.per_layer, self.budget(target_ratio), self.low_bits(target_ratio)))

    def low_bits(self, target_ratio: float) -> float:
        """The fewest bits of the searched layers that land within TARGET_TOLERANCE of the target."""
        return self.total_bits / (TARGET_TOLERANCE * target_ratio) - self.fixed_bits

    def apply(self, config: CompressConfig, choice: dict[str, Candidate]) -> tuple[CompressConfig, dict]:
        """The config with `choice` as per-layer overrides, and the choice table of the report."""
        table = {name: {"representation": c.representation, "slice_dim": c.slice_dim or None, "codebook_size": c.codebook_size or None,
                        "terms": c.terms or None, "scale": c.scale if c.representation == "binary" else None,
                        "dense": c.dense, "bits": c.bits, "damage": c.damage,
                        "candidates": len(self.per_layer[name]), "sensitivity": self.sensitivity.get(name)}
                 for name, c in choice.items()}
        return overrides_for(choice, config), table

    def choices(self, target_ratio: float) -> list[tuple[str, dict[str, Candidate]]]:
        """The allocation of least summed damage, then up to MAX_ALTERNATIVES others worth building and
        measuring end to end: where one layer's choice takes DOMINANT_SHARE or more of the budget, or the
        layer holds DOMINANT_SHARE or more of the searched weights (a classifier's FC: the allocation may
        have made it cheap), that layer in each other stored representation, the rest allocated again
        around it. Largest layers first.

        Summed damage is a model: it misjudges where one layer holds most of the bits, since the layers'
        errors do not add (the sequential fit corrects later layers for earlier ones) and output error is not
        the task's metric (bench/results/allocation_probe.md: OCR at 8x, summed damage 0.0225 for 66 % of
        strings kept, 0.0428 for 88 %). An alternative landing more than TARGET_TOLERANCE above the target
        (and above the first) is not offered: the check would keep it for less damage, and miss the target."""
        budget, low = self.budget(target_ratio), self.low_bits(target_ratio)
        first = allocate(self.per_layer, budget, low)
        out = [("least summed damage", first)]
        least_bits = min(low, sum(c.bits for c in first.values()))  # fewer: too far above
        dense = {name: max(x.bits for x in options) for name, options in self.per_layer.items()}
        weights = sum(dense.values())
        for name, c in sorted(first.items(), key=lambda kv: -max(kv[1].bits / budget, dense[kv[0]] / weights)):
            if c.bits < DOMINANT_SHARE * budget and dense[name] < DOMINANT_SHARE * weights:
                break
            for rep in ("int4", "int8", "binary"):
                options = [x for x in self.per_layer[name] if x.representation == rep]
                if rep == c.representation or not options:
                    continue
                try:
                    alt = allocate({**self.per_layer, name: options}, budget, low)
                except ConfigError:  # that representation alone does not fit the budget
                    continue
                if sum(x.bits for x in alt.values()) >= least_bits and all(alt != other for _, other in out):
                    out.append((f"{name} as {rep}", alt))
        return out[: 1 + MAX_ALTERNATIVES]


def layer_candidates_all(model: onnx.ModelProto, infos: list[ConvInfo], feeds: dict[str, np.ndarray],
                         config: CompressConfig, progress: Callable[[int, int, str], None] | None = None) -> Candidates:
    """Fit every layer the search may compress under each candidate setting on the original inputs (one
    data pass), and weigh each layer's damage by its measured end-to-end sensitivity. Fits use the rows of
    most samples; damage and sensitivity are measured on the others (calibrate.held_out_mask).

    Layers too thin for the config's slice depth (RGB and 1-channel stems) are candidates too, at the
    slice depths they allow."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wide = {i.node_index: i for i in analyse(model, replace(config, slice_dim=1))}
    infos = [wide[i.node_index] if i.node_index in wide and not i.eligible and wide[i.node_index].eligible
             and "slice depth" in (i.reason or "") else i for i in infos]
    todo = [i for i in infos if i.eligible and i.group == 1]
    opset = default_opset(model)
    grouped = grouped_int(model, infos, config, opset)  # grouped and depthwise convs: int8 / int4
    fixed, total, seen, measured = 0, 0, set(), set()
    for info in infos:
        if info.weight_name in seen or not info.shape or len(info.shape) != 4:
            continue
        seen.add(info.weight_name)
        dense = cost.dense_bits(*info.shape, info.bias_name is not None)
        total += dense
        if info.name in grouped:
            continue
        if not info.eligible or info.group != 1:
            fixed += dense
        else:
            measured.add(info.node_index)  # the first layer of each weight
    cands, refs = {}, {}
    with Walk(model, todo, feeds, config, sequential=False, needs=lambda i: i.node_index in measured,
              held_out=True) as walk:
        held_out = walk.held_out
        for info, stats in walk:
            if stats is None:
                continue
            fit, held = stats if held_out is not None else (stats, None)
            held = held if held is not None and held.n else None  # rows not per sample: damage in-sample
            bias = weights[info.bias_name] if info.bias_name else None
            cands[info.name], ref = layer_candidates(info, weights[info.weight_name], bias, fit, config, opset, held)
            if ref:
                refs[info.name] = ref
            if progress:
                progress(len(cands), len(measured), f"choosing settings: {info.name}")
    if not cands:
        raise ConfigError("choosing settings per layer needs at least one eligible Conv with group=1")
    gains = sensitivities(model, {i.name: i for i in todo}, refs,
                          feeds if held_out is None else {k: v[held_out] for k, v in feeds.items()})
    typical = float(np.median(list(gains.values()))) if gains else 1.0
    for name, options in cands.items():
        gain = float(np.clip(gains.get(name, typical), 1e-3 * typical, 1e3 * typical))
        cands[name] = [replace(c, damage=c.damage * gain) for c in options]
    # a grouped conv's damage: its relative weight error (the output error of a per-channel filter on its own
    # inputs, roughly) at the typical layer's sensitivity, as it has no walk stats of its own
    cands.update({name: [Candidate(d, m, k, bits, error * typical, rep, config.for_layer(name).scale)
                         for bits, error, rep, d, m, k in options] for name, options in grouped.items()})
    return Candidates(cands, fixed, total, gains)


RATIO_GRID = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def search_ratio(model: onnx.ModelProto, candidates: Candidates, held_out, config: CompressConfig, max_drop: float,
                 build: Callable[[CompressConfig], tuple[onnx.ModelProto, dict]]) -> tuple[float, list[dict]]:
    """The highest ratio of RATIO_GRID whose drop on the held-out data is <= max_drop, and the log of the
    tries. build(config) runs the fit and rewrite stages under the settings of one try."""
    val_feeds, val_labels = held_out
    reference = predict_top1(model, val_feeds)
    measure = "top-1 accuracy" if val_labels is not None else "top-1 agreement"
    tries: list[dict] = []

    def drop(ratio):
        cfg, _ = candidates.settings(config, ratio)
        out, rep = build(cfg)
        pred = predict_top1(out, val_feeds)
        if val_labels is not None:
            points = 100 * (np.mean(reference == val_labels) - np.mean(pred == val_labels))
        else:
            points = 100 * (1 - np.mean(pred == reference))
        tries.append({"target_ratio": ratio, "conv_ratio": rep["conv_ratio"], "drop_points": float(points),
                      "measure": measure, "passed": bool(points <= max_drop)})
        log.info("max-drop search: target %gx -> conv ratio %.1fx, %s drop %.2f points on %d held-out samples (%s)",
                 ratio, rep["conv_ratio"], measure, points, len(reference),
                 "within" if points <= max_drop else "over", )
        return points

    grid = [r for r in RATIO_GRID if r <= candidates.max_ratio] or [candidates.max_ratio]
    lo, hi = -1, len(grid)  # invariant: grid[lo] passes (or none yet), grid[hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if drop(grid[mid]) <= max_drop else (lo, mid)
    if lo < 0:
        raise OnnxstackError(f"no ratio keeps the drop within {max_drop} points: at {grid[0]:g}x the drop is "
                             f"{tries[-1]['drop_points']:.2f} points on {len(reference)} held-out samples")
    return float(grid[lo]), tries


def hold_out(feeds, labels, seed):
    """(calibration feeds, (held-out feeds, held-out labels)): a seeded random quarter is held out."""
    n = len(next(iter(feeds.values())))
    if n < 8:
        raise ConfigError(f"--max-drop needs at least 8 samples to hold some out, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    calib, held = np.sort(order[n // 4:]), np.sort(order[: n // 4])
    return ({k: v[calib] for k, v in feeds.items()},
            ({k: v[held] for k, v in feeds.items()}, labels[held] if labels is not None else None))


def end_to_end(reference, outputs) -> dict:
    """How far a compressed model's outputs moved from the original's, over batches: `reference` and
    `outputs` iterate the same batches as {output name: array}.

    output_rel_mse: sum (a - b)^2 / sum (b - mean b)^2, summed over the float outputs (a compressed,
    b original); argmax_disagreement: on the first float output that holds scores over its last axis, the
    share of positions whose argmax over that axis changed: (B, K) and (B, K, 1, 1) logits (top-1 of a
    classifier), and rank-3 outputs whose last axis is the longest ((T, N, C) or (B, T, C) symbol scores of
    a sequence model; a detector's (B, A, 5+C) rows are not scores). rank orders alternatives: the
    disagreement first where there is one (what classifier and sequence users read), the squared error
    after it."""
    sq, flips, positions = {}, 0, 0
    scores = None
    for ref, got in zip(reference, outputs):
        for name, b in ref.items():
            if not np.issubdtype(b.dtype, np.floating):
                continue
            a = got[name].astype(np.float64)
            b = b.astype(np.float64)
            e, s1, s2, n = sq.get(name, (0.0, 0.0, 0.0, 0))
            sq[name] = (e + float(np.sum((a - b) ** 2)), s1 + float(b.sum()), s2 + float(np.sum(b * b)), n + b.size)
            if scores is None and _scores_last(b):
                scores = name
            if name == scores:
                a2, b2 = a.reshape(-1, b.shape[1]) if b.ndim != 3 else a, b.reshape(-1, b.shape[1]) if b.ndim != 3 else b
                flips += int(np.sum(a2.argmax(-1) != b2.argmax(-1)))
                positions += b2.size // b2.shape[-1]
    mse = sum(e / max(s2 - s1 * s1 / n, 1e-30) for e, s1, s2, n in sq.values())
    out = {"output_rel_mse": float(mse)}
    if positions:
        out["argmax_disagreement"] = flips / positions
    out["measure"] = "argmax disagreement, then output relative squared error" if positions else \
        "output relative squared error"
    out["rank"] = (out.get("argmax_disagreement", 0.0), out["output_rel_mse"])
    return out


def _scores_last(y: np.ndarray) -> bool:
    """Does `y` hold class or symbol scores over its last axis (its axis 1 for (B, K, 1, 1) logits)?"""
    if y.ndim == 3:
        return y.shape[-1] >= 2 and y.shape[-1] == max(y.shape)
    return y.ndim >= 2 and y.shape[1] >= 2 and all(d == 1 for d in y.shape[2:])
