"""Bits to layers: the choice per layer of least summed damage within a bit budget (pure numpy).

Each layer has options with `bits` and `damage` (search.Candidate); an allocation picks one a layer.

- `lagrangian(options, budget)`: each layer takes argmin damage + lambda * bits, lambda bisected until the
  budget holds, then the spare bits go to the upgrades that save the most damage a bit (`_fill`). Fast,
  and where more bits buy no less damage it stops short of the budget: a model with few layers and a
  coarse ladder lands well above the target ratio (MNIST's 3 convs at 6x: 7.0x).
- `in_window(options, low, high)`: the least summed damage among allocations of low to high bits, exact
  up to the rounding of bits to high / BINS (dynamic programming over the bits, a layer at a time), for a
  target ratio that must land within a tolerance even where more bits buy nothing.
"""

from __future__ import annotations

import numpy as np

BINS = 4096  # the window's upper end in this many units of bits


def lagrangian(options: dict, budget: float) -> dict:
    """Least summed damage within `budget` bits by Lagrangian relaxation; the cheapest options must fit."""
    def pick(lam):
        return {k: min(c, key=lambda x: (x.damage + lam * x.bits, x.bits)) for k, c in options.items()}

    lo, hi = 0.0, 1.0
    while sum(x.bits for x in pick(hi).values()) > budget:
        hi *= 4
    if sum(x.bits for x in pick(lo).values()) <= budget:
        return pick(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(x.bits for x in pick(mid).values()) > budget else (lo, mid)
    return _fill(pick(hi), options, budget)


def _fill(choice: dict, options: dict, budget: float) -> dict:
    """Spend what the relaxation left of the budget: take the upgrade with the most damage saved per
    extra bit, while one fits."""
    choice = dict(choice)
    while True:
        spare = budget - sum(c.bits for c in choice.values())
        best, best_rate = None, 0.0
        for name, layer in options.items():
            now = choice[name]
            for c in layer:
                extra, saved = c.bits - now.bits, now.damage - c.damage
                if saved > 0 and 0 < extra <= spare and saved / extra > best_rate:
                    best, best_rate = (name, c), saved / extra
        if best is None:
            return choice
        choice[best[0]] = best[1]


def in_window(options: dict, low: float, high: float) -> dict | None:
    """Least summed damage among allocations of `low` to `high` bits; None when none falls there.

    Bits are rounded up to units of high / BINS, so an allocation found never exceeds `high`; it is kept
    at least (number of layers) units above `low`, so the rounding cannot take it below."""
    unit = high / BINS
    names = list(options)
    best = np.full(BINS + 1, np.inf)  # least damage of the layers so far, per number of units used
    best[0] = 0.0
    steps = []
    for name in names:
        units = np.ceil(np.array([c.bits for c in options[name]], np.float64) / unit).astype(np.int64)
        new, arg = np.full(BINS + 1, np.inf), np.full(BINS + 1, -1)
        for i, (u, c) in enumerate(zip(units, options[name])):
            if u > BINS:
                continue
            trial = np.full(BINS + 1, np.inf)
            trial[u:] = best[: BINS + 1 - u] + c.damage
            better = trial < new
            new[better], arg[better] = trial[better], i
        best = new
        steps.append((units, arg))
    floor = int(np.ceil(low / unit)) + len(names)
    if floor > BINS or not np.isfinite(best[floor:]).any():
        return None
    at = floor + int(np.argmin(best[floor:]))
    choice = {}
    for name, (units, arg) in zip(reversed(names), reversed(steps)):
        i = int(arg[at])
        choice[name] = options[name][i]
        at -= int(units[i])
    return choice
