"""Choosing slice depth and codebook size per layer to reach a target ratio with the least damage.

Each eligible layer is fitted on calibration data under a grid of (d, m) candidates; a candidate's
damage is its relative output error on the original inputs,

    damage = || X (W_hat - W) + (b_hat - b) ||^2 / || X W - mean ||^2     (sampled positions),

and its cost the bits it stores. The allocation minimises the summed damage under the bit budget that
the target conv ratio leaves, by Lagrangian relaxation: each layer takes argmin damage + lambda * bits,
and lambda is bisected until the budget holds. Layers differ a lot in how much they tolerate, so the
bits go where they buy the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analyse import ConvInfo
from .config import CompressConfig, LayerOverride
from .core import cost
from .core.calib import LayerStats, OutputMetric, fit_output_aware
from .core.fit import from_slices
from .errors import ConfigError

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
        slices = n * -(-cg // d)
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
        fit, new_bias = fit_output_aware(weight, stats, d, m, terms=k, iterations=min(config.iterations, 8),
                                         seed=config.seed, rounds=1, metric=metrics[d])
        bits = cost.compressed_bits(n, -(-cg // d), d, kh, kw, m, "slice", True, k)["total"]
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
    from dataclasses import replace

    return replace(config, overrides=ov)
