"""onnxstack.dataquality: near-duplicate and too-few samples; whether calibration rows pin a layer down."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnxstack.core.calib import LayerStats
from onnxstack.augment import augment
from onnxstack.data import from_arrays
from onnxstack.dataquality import check_dataset, check_layer, check_samples, warn

from .test_data import RGB


def smooth_images(n, seed=0, shape=(3, 32, 32)):
    """Random low-pass images (neighbouring pixels correlated, like photos), in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape))
    for axis in range(2, x.ndim):
        x = (x + np.roll(x, 1, axis) + np.roll(x, 2, axis) + np.roll(x, -1, axis)) / 4
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def test_planted_duplicates_are_found():
    x = smooth_images(300)
    rng = np.random.default_rng(1)
    x[40] = x[3]                                                              # exact copy
    x[120] = np.clip(x[7] + 1e-3 * rng.standard_normal(x[7].shape), 0, 1)    # copy with faint noise
    x[250] = x[11] * 0.9 + 0.05                                               # contrast and brightness change
    found = check_samples({"x": x})
    assert found.samples == found.checked == 300 and found.duplicates == 3
    assert found.examples == ((3, 40), (7, 120), (11, 250))
    (line,) = found.warnings
    assert line.startswith("3 of 300 calibration samples are near-duplicates") and "samples 3 and 40" in line
    assert found.to_dict()["duplicate_examples"][0] == [3, 40]


def test_random_images_are_not_duplicates():
    for x in (smooth_images(400, seed=2), np.random.default_rng(3).random((400, 1, 28, 28))):
        found = check_samples({"x": x})
        assert found.duplicates == 0 and found.warnings == ()


def test_duplicates_need_every_input_alike_and_large_sets_are_subsampled():
    x, y = smooth_images(200, seed=4), smooth_images(200, seed=5, shape=(8,))
    x[9] = x[2]
    assert check_samples({"a": x, "b": y}).duplicates == 0  # b differs
    y[9] = y[2]
    assert check_samples({"a": x, "b": y}).duplicates == 1
    found = check_samples({"a": x}, max_checked=150, seed=0)
    assert found.samples == 200 and found.checked == 150 and found.duplicates <= 1


def test_too_few_samples(caplog):
    x = smooth_images(20, seed=6)
    found = check_samples({"x": x})
    assert found.duplicates == 0 and found.warnings == (
        "only 20 calibration samples; the output-aware fit wants a few hundred or more (about 1,000): pass more "
        "data, or stretch an image set with --augment N",)
    x = np.repeat(smooth_images(60, seed=7), 2, axis=0)  # 120 samples, 60 distinct
    found = check_samples({"x": x})
    assert found.duplicates == 60 and len(found.warnings) == 2 and "only 60 distinct" in found.warnings[1]
    with caplog.at_level(logging.WARNING, logger="onnxstack"):
        warn(found)
    assert [r.getMessage() for r in caplog.records] == list(found.warnings)


def test_the_dataset_check_leaves_augmented_views_out():
    x = np.random.default_rng(8).random((120, 3, 4, 4)).astype(np.float32)
    data = augment(from_arrays({"x": x}, RGB), 3, seed=0)
    found = check_dataset(data)
    assert len(data) == 360 and found.samples == 120 and found.duplicates == 0


def stats_of(X, n_out=4, seed=0):
    stats = LayerStats.empty(X.shape[1], n_out)
    stats.add(X, np.random.default_rng(seed).standard_normal((len(X), n_out)))
    return stats


def test_a_full_rank_layer_passes():
    X = np.random.default_rng(0).standard_normal((3000, 32 * 9))  # K = 32 channels x 3x3
    X[:, 9:18] = 0  # a dead input channel: constant, not a gap in the data
    check = check_layer(stats_of(X), 16, (3, 3), name="conv2")
    assert check.reason is None and check.warnings == ()
    assert (check.rows, check.features, check.constant_features, check.rank) == (3000, 288, 9, 279)
    assert check.slice_weights == 144 and check.weakest_slice_rank == check.weakest_slice_features


def test_too_few_rows_for_a_slice():
    X = np.random.default_rng(1).standard_normal((100, 288))
    check = check_layer(stats_of(X), 16, (3, 3))
    assert check.rank == 99  # centred: n - 1
    assert check.reason.startswith("100 calibration rows for the 144 weights of a slice (d=16 x 3x3)")


def test_rank_deficient_layers_are_flagged():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 288))  # fewer than 4 rows a feature: more data could close a gap
    X[:, :40] = X[:, 40:80] @ rng.standard_normal((40, 40))  # slice 0 spans 104 of its 144 features
    check = check_layer(stats_of(X), 16, (3, 3), name="conv1")
    assert check.rank == 248 and check.weakest_slice == 0 and check.weakest_slice_rank == 104
    assert check.reason.startswith("the inputs of slice 0 span 104 of its 144 varying features")
    many = rng.standard_normal((4000, 288))
    many[:, :40] = many[:, 40:80] @ rng.standard_normal((40, 40))  # the same gap over 4000 rows: the network's
    plenty = check_layer(stats_of(many), 16, (3, 3))
    assert plenty.weakest_slice_rank == 104 and plenty.reason is None  # measured and reported, not warned
    X = rng.standard_normal((1000, 288))
    X[:, :100] = X[:, 144:244] @ rng.standard_normal((100, 100))  # across slices: each alone is full rank
    check = check_layer(stats_of(X), 16, (3, 3))
    assert check.rank == 188 and check.weakest_slice_rank == 144
    assert check.reason.startswith("the calibration inputs span 188 of the layer's 288 varying input features")
    X = rng.standard_normal((3000, 20)) @ rng.standard_normal((20, 288))  # rank 20 < D
    check = check_layer(stats_of(X), 16, (3, 3))
    assert check.rank == 20 and "span only 20 independent directions, fewer than the 144 weights" in check.reason
    assert check.to_dict()["reason"] == check.reason


@pytest.mark.parametrize("d,kernel", [(4, (1, 1)), (3, (3, 3)), (8, (1, 3))])
def test_ragged_last_slice_and_other_kernels(d, kernel):
    K = 10 * kernel[0] * kernel[1]  # 10 channels: the last slice is short
    check = check_layer(stats_of(np.random.default_rng(3).standard_normal((2000, K))), d, kernel)
    assert check.reason is None and check.rank == K
