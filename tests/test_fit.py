import numpy as np
import pytest

from onnxstack.core.fit import fit_binary_codebook, from_slices, relative_error, to_slices


def planted(N=64, s=3, D=36, m=12, scale="slice", seed=0):
    rng = np.random.default_rng(seed)
    book = np.where(rng.standard_normal((m, D)) > 0, 1.0, -1.0)
    idx = rng.integers(0, m, (N, s))
    if scale == "slice":
        alpha = rng.uniform(0.5, 2.0, (N, s)) * rng.choice([-1, 1], (N, s))
    else:
        alpha = np.repeat(rng.uniform(0.5, 2.0, (N, 1)), s, axis=1)
    return (book[idx] * alpha[:, :, None]).astype(np.float32), book, idx


@pytest.mark.parametrize("scale", ["slice", "filter"])
def test_recovers_planted_codebook(scale):
    slices, book, idx = planted(scale=scale)
    fit = fit_binary_codebook(slices, 12, scale=scale, iterations=50, seed=0)
    assert relative_error(slices, fit) < 2e-3  # float16 scale rounding only
    # the same partition of slices, up to a relabelling and sign of codewords
    decoded = fit.codebook[fit.indices[:, :, 0]]
    np.testing.assert_array_equal(np.abs(np.einsum("nsd,nsd->ns", decoded, book[idx])), 36)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    slices = rng.standard_normal((40, 5, 27)).astype(np.float32)
    a = fit_binary_codebook(slices, 16, seed=7)
    b = fit_binary_codebook(slices, 16, seed=7)
    for x, y in zip((a.codebook, a.indices, a.scales), (b.codebook, b.indices, b.scales)):
        np.testing.assert_array_equal(x, y)


def _random_codebook_error(slices, m, rng):
    """Relative error of m random +-1 codewords, each slice on its best codeword with its least-squares scale."""
    X = slices.reshape(-1, slices.shape[-1]).astype(np.float64)  # (N*s, D)
    B = np.where(rng.standard_normal((m, X.shape[1])) > 0, 1.0, -1.0)  # (m, D)
    corr = X @ B.T  # (N*s, m)
    best = np.abs(corr).argmax(1)
    approx = (corr[np.arange(len(X)), best] / X.shape[1])[:, None] * B[best]
    return float(np.linalg.norm(X - approx) / np.linalg.norm(X))


def test_fit_beats_an_unfitted_codebook_and_plain_binarisation_at_equal_bits():
    rng = np.random.default_rng(4)
    slices = rng.standard_normal((128, 4, 72)).astype(np.float32)
    fit = fit_binary_codebook(slices, 64)
    err = relative_error(slices, fit)
    assert err < 0.97 * _random_codebook_error(slices, 64, rng)  # fitting the codebook pays
    # slices drawn from 64 sign patterns (with noise): the fit finds them, its error near the noise's, far
    # below the 0.6 that sign(W)*mean|W| leaves on Gaussian weights
    patterns = np.where(rng.standard_normal((64, 72)) > 0, 1.0, -1.0)
    structured = (patterns[rng.integers(0, 64, (128, 4))] * rng.uniform(0.5, 2, (128, 4, 1))
                  + 0.05 * rng.standard_normal((128, 4, 72))).astype(np.float32)
    assert relative_error(structured, fit_binary_codebook(structured, 64)) < 0.2
    # more codewords never hurt
    assert relative_error(slices, fit_binary_codebook(slices, 256)) < err


@pytest.mark.parametrize("C,d", [(10, 4), (16, 16), (17, 16), (3, 3), (5, 1)])
def test_slicing_roundtrip_with_padding(C, d):
    rng = np.random.default_rng(C)
    w = rng.standard_normal((6, C, 3, 2)).astype(np.float32)
    s = to_slices(w, d)
    assert s.shape == (6, -(-C // d), d * 6)
    np.testing.assert_array_equal(from_slices(s, C, (3, 2)), w)
    assert np.all(s.reshape(6, -1, 3, 2)[:, C:] == 0)


def test_codebook_size_bounds():
    slices = np.ones((2, 2, 9), np.float32)
    with pytest.raises(ValueError, match="codebook size"):
        fit_binary_codebook(slices, 5)
    with pytest.raises(ValueError, match="codebook size"):
        fit_binary_codebook(slices, 1)


def test_scales_fit_float16():
    slices = np.full((4, 2, 9), 1e6, np.float32)
    fit = fit_binary_codebook(slices, 2)
    assert np.all(np.isfinite(fit.scales.astype(np.float16)))


@pytest.mark.parametrize("scale", ["slice", "filter"])
def test_stacked_terms_cut_the_error(scale):
    rng = np.random.default_rng(5)
    slices = rng.standard_normal((64, 4, 36)).astype(np.float32)
    errs = []
    for k in (1, 2, 3):
        fit = fit_binary_codebook(slices, 32, scale=scale, terms=k)
        assert fit.indices.shape == (64, 4, k)
        assert fit.scales.shape == ((64, 4, k) if scale == "slice" else (64, 1, k))
        errs.append(relative_error(slices, fit))
    assert errs[0] > errs[1] > errs[2]
