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
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .analyse import ConvInfo
from .calibrate import Targets, original_targets
from .config import CompressConfig, LayerOverride
from .core import cost
from .core.calib import LayerStats, OutputMetric, fit_output_aware, fit_output_aware_filter
from .core.fit import ceil_div, from_slices
from .errors import ConfigError, OnnxstackError
from .runtime import predict_top1

log = logging.getLogger("onnxstack")

SLICE_DIMS = (4, 8, 16, 32)
CODEBOOK_SIZES = (16, 64, 256)


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer; slice_dim 0 means: keep it dense."""

    slice_dim: int
    codebook_size: int
    terms: int
    bits: int
    damage: float

    @property
    def dense(self) -> bool:
        return self.slice_dim == 0


def candidate_grid(info: ConvInfo, config: CompressConfig) -> list[tuple[int, int, int]]:
    """(d, m, k) worth trying for one layer: d up to its channels, m powers of two up to its slices / 2,
    k = 1 or 2 terms."""
    n, cg = info.shape[:2]
    pairs = []
    for d in SLICE_DIMS:
        if d > cg:
            continue
        slices = n * ceil_div(cg, d)
        for m in CODEBOOK_SIZES:
            if m <= max(2, slices // 2):
                pairs += [(d, m, 1), (d, m, 2)]
    return pairs


def damage(weight: np.ndarray, fit, new_bias: np.ndarray, stats: LayerStats) -> float:
    """Relative output error of a fitted layer against the original outputs the stats were taken with."""
    n, cg, kh, kw = weight.shape
    return stats.relative_error(from_slices(fit.decode(), cg, (kh, kw)).reshape(n, -1), new_bias)


def layer_candidates(info: ConvInfo, weight: np.ndarray, bias: np.ndarray | None, stats: LayerStats,
                     config: CompressConfig) -> list[Candidate]:
    out = []
    n, cg, kh, kw = weight.shape
    metrics = {}
    for d, m, k in candidate_grid(info, config):
        if d not in metrics:
            metrics[d] = OutputMetric.build(stats, n, cg, d, (kh, kw), config.calibration_damp)
        if config.scale == "filter":
            fit, new_bias = fit_output_aware_filter(weight, stats, d, m, terms=k, damp=config.calibration_damp,
                                                    iterations=min(config.iterations, 8), seed=config.seed)
        else:
            fit, new_bias = fit_output_aware(weight, stats, d, m, terms=k, iterations=min(config.iterations, 8),
                                             seed=config.seed, rounds=1, metric=metrics[d])
        bits = cost.compressed_bits(n, ceil_div(cg, d), d, kh, kw, m, config.scale, True, k)["total"]
        out.append(Candidate(d, m, k, bits, damage(weight, fit, new_bias, stats)))
    out.append(Candidate(0, 0, 0, cost.dense_bits(n, cg, kh, kw, bias is not None), 0.0))
    return out


def allocate(candidates: dict[str, list[Candidate]], budget_bits: float) -> dict[str, Candidate]:
    """The choice per layer that minimises summed damage within the bit budget."""
    def pick(lam):
        return {k: min(c, key=lambda x: (x.damage + lam * x.bits, x.bits)) for k, c in candidates.items()}

    cheapest = sum(min(x.bits for x in c) for c in candidates.values())
    if cheapest > budget_bits:
        raise ConfigError(f"the target ratio needs {budget_bits:.0f} bits for the compressed layers, but their "
                          f"smallest settings take {cheapest}; lower the target")
    lo, hi = 0.0, 1.0
    while sum(x.bits for x in pick(hi).values()) > budget_bits:
        hi *= 4
    if sum(x.bits for x in pick(lo).values()) <= budget_bits:
        return pick(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(x.bits for x in pick(mid).values()) > budget_bits else (lo, mid)
    return _fill(pick(hi), candidates, budget_bits)


def _fill(choice: dict[str, Candidate], candidates: dict[str, list[Candidate]], budget_bits: float):
    """Spend what the relaxation left of the budget: take the upgrade with the most damage saved per
    extra bit, while one fits."""
    choice = dict(choice)
    while True:
        spare = budget_bits - sum(c.bits for c in choice.values())
        best, best_rate = None, 0.0
        for name, options in candidates.items():
            now = choice[name]
            for c in options:
                extra, saved = c.bits - now.bits, now.damage - c.damage
                if saved > 0 and 0 < extra <= spare and saved / extra > best_rate:
                    best, best_rate = (name, c), saved / extra
        if best is None:
            return choice
        choice[best[0]] = best[1]


def overrides_for(choice: dict[str, Candidate], config: CompressConfig) -> CompressConfig:
    """The config with the chosen (d, m) of every layer as per-layer overrides."""
    ov = dict(config.overrides)
    for name, c in choice.items():
        old = ov.get(name, LayerOverride())
        if c.dense:
            ov[name] = LayerOverride(skip=True, reason="kept dense by the target-ratio allocation")
        else:
            ov[name] = LayerOverride(slice_dim=c.slice_dim, codebook_size=c.codebook_size, terms=c.terms,
                                     execution=old.execution, skip=old.skip, reason=old.reason)
    return replace(config, overrides=ov)


@dataclass
class Candidates:
    """Every eligible layer's (d, m, k) candidates with their damage, and the bits the convs take."""

    per_layer: dict
    fixed_bits: int  # layers that stay as they are
    total_bits: int  # all conv weights and biases, dense
    targets: Targets

    @property
    def max_ratio(self) -> float:
        """The highest conv ratio the candidates reach (every layer at its smallest setting)."""
        return self.total_bits / (self.fixed_bits + sum(min(c.bits for c in cs) for cs in self.per_layer.values()))

    def settings(self, config: CompressConfig, target_ratio: float) -> tuple[CompressConfig, dict]:
        """Per-layer overrides reaching `target_ratio` with the least summed damage, and the choice table."""
        budget = self.total_bits / target_ratio - self.fixed_bits
        if budget <= 0:
            raise ConfigError(f"target ratio {target_ratio:g} is out of reach: the layers left dense alone "
                              f"take {self.fixed_bits} of the {self.total_bits / target_ratio:.0f} bits it allows")
        choice = allocate(self.per_layer, budget)
        table = {name: {"slice_dim": c.slice_dim or None, "codebook_size": c.codebook_size or None,
                        "terms": c.terms or None, "dense": c.dense, "bits": c.bits, "damage": c.damage,
                        "candidates": len(self.per_layer[name])} for name, c in choice.items()}
        return overrides_for(choice, config), table


def layer_candidates_all(model: onnx.ModelProto, infos: list[ConvInfo], feeds: dict[str, np.ndarray],
                         config: CompressConfig) -> Candidates:
    """Fit every eligible layer under each candidate setting on the original inputs (one data pass)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    todo = [i for i in infos if i.eligible]
    targets = original_targets(model, todo, feeds, config, with_stats=True)
    fixed, total, cands, seen = 0, 0, {}, set()
    for info in infos:
        if info.weight_name in seen or not info.shape or len(info.shape) != 4:
            continue
        seen.add(info.weight_name)
        dense = cost.dense_bits(*info.shape, info.bias_name is not None)
        total += dense
        if not info.eligible or info.group != 1:
            fixed += dense
            continue
        bias = weights[info.bias_name] if info.bias_name else None
        cands[info.name] = layer_candidates(info, weights[info.weight_name], bias,
                                            targets.stats[info.node_index], config)
    if not cands:
        raise ConfigError("choosing settings per layer needs at least one eligible Conv with group=1")
    return Candidates(cands, fixed, total, targets)


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
