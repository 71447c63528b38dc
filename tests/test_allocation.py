"""core/allocation.py: the relaxation and the windowed dynamic programme, against brute force."""

import itertools

import numpy as np
import pytest

from onnxstack.core.allocation import BINS, in_window, lagrangian
from onnxstack.search import Candidate


def problem(seed, layers=4, options=5):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        bits = np.sort(rng.integers(50, 2000, options))
        damage = np.sort(rng.random(options))[::-1] * rng.uniform(0.1, 3)  # more bits, less damage (mostly)
        damage[rng.integers(options)] *= rng.uniform(0.5, 2)  # a noisy measurement breaks the order
        out[f"l{i}"] = [Candidate(0, 0, 0, int(b), float(d), "int8") for b, d in zip(bits, damage)]
    return out


def every(options):
    names = list(options)
    for combo in itertools.product(*(options[n] for n in names)):
        yield dict(zip(names, combo))


def spent(choice):
    return sum(c.bits for c in choice.values())


def harm(choice):
    return sum(c.damage for c in choice.values())


@pytest.mark.parametrize("seed", range(8))
def test_the_window_finds_the_least_damage_between_its_bounds(seed):
    options = problem(seed)
    high = 0.5 * sum(max(c.bits for c in cs) for cs in options.values())
    low = high / 1.15
    got = in_window(options, low, high)
    unit = high / BINS
    inside = [a for a in every(options) if low + 2 * len(options) * unit <= spent(a) <= high - len(options) * unit]
    if got is None:
        assert not inside
        return
    assert low <= spent(got) <= high
    assert not inside or harm(got) <= min(harm(a) for a in inside) + 1e-12


def test_the_window_spends_bits_the_relaxation_leaves_when_they_buy_nothing():
    # one layer whose larger options measure no less damage: the relaxation takes its smallest
    flat = [Candidate(0, 0, 0, b, 0.01, "int8") for b in (100, 400, 800)]
    steep = [Candidate(0, 0, 0, b, d, "int8") for b, d in ((10, 0.5), (20, 0.1))]
    options = {"flat": flat, "steep": steep}
    first = lagrangian(options, 900)
    assert spent(first) == 120  # 7.5x below the budget: more bits measured no less damage
    windowed = in_window(options, 900 / 1.15, 900)
    assert 900 / 1.15 <= spent(windowed) <= 900 and windowed["steep"].bits == 20
    assert in_window(options, 2000, 2100) is None  # more than every option together
