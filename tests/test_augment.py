"""onnxstack.augment: seeded views of an image set (crops, shifts, flips), originals first, labels repeated."""

from __future__ import annotations

import numpy as np
import pytest

from onnxstack.augment import _resample, augment
from onnxstack.data import from_arrays
from onnxstack.errors import ConfigError, DataError

from .test_data import NHWC, RGB, parse

def test_augment_is_seeded_and_keeps_the_originals_first():
    x = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    data = from_arrays({"x": x, "labels": np.arange(6) % 2}, RGB)
    a, b, c = augment(data, 4, seed=1), augment(data, 4, seed=1), augment(data, 4, seed=2)
    (fa, la), (fb, lb), (fc, _) = a.arrays(), b.arrays(), c.arrays()
    assert len(a) == 24 and a.original_size == 6 and fa["x"].shape == (24, 3, 4, 4) and fa["x"].dtype == np.float32
    assert np.array_equal(fa["x"], fb["x"]) and np.array_equal(la, lb) and not np.array_equal(fa["x"], fc["x"])
    assert np.array_equal(fa["x"][:6], x) and np.array_equal(la, np.tile(np.arange(6) % 2, 4))
    assert not np.any(np.all(fa["x"][6:] == np.tile(x, (3, 1, 1, 1)), axis=(1, 2, 3)))  # every view differs
    assert fa["x"].min() >= x.min() and fa["x"].max() <= x.max()  # bilinear: inside the pixel range
    batched = np.concatenate([f["x"] for f, _ in a.batches(5)])
    assert np.array_equal(batched, fa["x"])
    assert augment(data, 1) is data


def test_augment_views_are_crops_shifts_and_flips():
    x = np.random.default_rng(1).random((1, 2, 5, 7)).astype(np.float32)
    same, mirror, shift = np.array([[1, 0, 1, 0]]), np.array([[1, 0, -1, 6]]), np.array([[1, 1, 1, 0]])
    assert np.allclose(_resample(x, same, "nchw"), x)
    assert np.allclose(_resample(x, mirror, "nchw"), x[..., ::-1])
    moved = _resample(x, shift, "nchw")
    assert np.allclose(moved[:, :, :-1], x[:, :, 1:]) and np.allclose(moved[:, :, -1], x[:, :, -1])
    nhwc = x.transpose(0, 2, 3, 1)
    assert np.allclose(_resample(nhwc, mirror, "nhwc"), nhwc[:, :, ::-1])


def test_augment_nhwc_and_refusals():
    x = np.random.default_rng(2).random((3, 4, 4, 3)).astype(np.float32)
    views = augment(from_arrays({"x": x}, NHWC), 2, seed=0).arrays()[0]["x"]
    assert views.shape == (6, 4, 4, 3) and np.array_equal(views[:3], x)
    with pytest.raises(ConfigError, match="augment factor must be a positive integer, got 0"):
        augment(from_arrays({"x": x}, NHWC), 0)
    vec = from_arrays({"x": np.zeros((4, 3), np.float32)}, parse("float[N, 3] x"))
    with pytest.raises(DataError, match=r"--augment stretches images \(one float input of rank 4\); this data has 'x' \(3,\)"):
        augment(vec, 2)
