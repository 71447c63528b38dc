"""Can the calibration data pin the fit down? Two checks, pure numpy, that return findings instead of raising.

Samples (`check_samples`, `check_dataset`): too few samples, and near-duplicates. Each sample of each
input is reduced to a fingerprint (every axis past the sample axis area-averaged down to at most
FINGERPRINT_BINS values); two samples are near-duplicates when, for every input,

    min(cos(f_i, f_j), cos(f_i - mean(f_i), f_j - mean(f_j))) > threshold      (0.999 by default)

(the centred cosine ignores a shared background, the plain one a brightness shift). A sample that is a
near-duplicate of an earlier one adds almost nothing to the fit.

One layer (`check_layer`): the output-aware fit solves W* = H^-1 G with H = Xc^T Xc over the sampled
im2col rows (core/calib.py). Directions of the K input features that the rows do not span are not
fitted from the data but from the damping, so the data pins the layer down only when H has full
effective rank on the features that vary:

    rank = #{pivots of a pivoted Cholesky of H > rel_tol * lambda_max(H)}     (a rank-revealing stand-in
                                                                               for the eigenvalues, at the
                                                                               cost of one Cholesky)

compared with K (less the constant features: dead channels, which no data can pin and none needs) and
with each slice's d*kh*kw weights (its diagonal block of H). A gap in the rank is the data's fault, and
warned about, only while the layer has fewer than UNDERDETERMINED rows a feature (core.calib, where the
fit's ridge is chosen on held-out rows for the same reason): past that, more samples would not
close it (the layer's input channels are correlated or nearly dead: a ResNet-50 on 512 images has a slice
of 15 independent features among 16 in most layers), and the fit's ridge toward the original weight
handles such directions; the check is still in the report. Fewer independent directions than a slice
has weights is warned about whatever the rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .core.calib import UNDERDETERMINED

log = logging.getLogger("onnxstack")

DUPLICATE_COSINE = 0.999
FINGERPRINT_BINS = 16   # per axis
MIN_SAMPLES = 100       # below this the output-aware fit tends to learn the samples, not the inputs
MAX_CHECKED = 8192      # a seeded subset beyond this (the pairwise check is quadratic)
RANK_TOL = 1e-6
_CHUNK = 512            # rows of the pairwise similarity computed at once (and most samples a batch reads),
_CHUNK_VALUES = 1 << 17  # or fewer: (rows, n) similarities of at most this many values
_BATCH_BYTES = 8 << 20  # feeds read at once by check_dataset


# --- samples ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleFindings:
    """What the sample check found; `warnings` holds one line per problem (empty when none)."""

    samples: int
    checked: int                      # samples compared (all, or a seeded subset of MAX_CHECKED)
    duplicates: int                   # checked samples that are near-duplicates of an earlier one
    examples: tuple[tuple[int, int], ...] = ()  # a few (earlier, later) duplicate pairs, sample indices
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        """For the report (JSON types only)."""
        return {"samples": self.samples, "checked": self.checked, "duplicates": self.duplicates,
                "duplicate_examples": [list(p) for p in self.examples], "warnings": list(self.warnings)}


def check_samples(feeds: Mapping[str, np.ndarray], *, threshold: float = DUPLICATE_COSINE,
                  min_samples: int = MIN_SAMPLES, max_checked: int = MAX_CHECKED, seed: int = 0) -> SampleFindings:
    """Too few samples and near-duplicate samples in `feeds` (input name -> array, axis 0 the samples)."""
    if not feeds:
        return SampleFindings(0, 0, 0, warnings=("no calibration samples",))
    n = len(next(iter(feeds.values())))
    idx = _checked(n, max_checked, seed)
    prints = [_fingerprints(np.asarray(v)[idx]) for v in feeds.values()]  # each (2, n', F): plain, centred
    return _findings(n, idx, prints, threshold, min_samples)


def check_dataset(data, *, threshold: float = DUPLICATE_COSINE, min_samples: int = MIN_SAMPLES,
                  max_checked: int = MAX_CHECKED, seed: int = 0) -> SampleFindings:
    """check_samples on a Dataset's own samples (those an --augment stretch derived from are left out), read
    a batch at a time: only the fingerprints of the samples are held."""
    n = min(getattr(data, "original_size", None) or len(data), len(data))
    if n == 0:
        return check_samples(data.take(np.arange(0)), threshold=threshold, min_samples=min_samples)
    idx = _checked(n, max_checked, seed)
    batch = data.batch_for(_BATCH_BYTES, _CHUNK)
    per_input: dict[str, np.ndarray] = {}  # input -> (2, len(idx), F), filled a batch at a time
    for start in range(0, len(idx), batch):
        for name, x in data.take(idx[start:start + batch]).items():
            f = _fingerprints(x)
            if name not in per_input:
                per_input[name] = np.empty((2, len(idx), f.shape[2]), f.dtype)
            per_input[name][:, start:start + len(x)] = f
    if not per_input:
        return SampleFindings(0, 0, 0, warnings=("no calibration samples",))
    return _findings(n, idx, list(per_input.values()), threshold, min_samples)


def _checked(n: int, max_checked: int, seed: int) -> np.ndarray:
    """The samples compared: all, or a seeded subset of max_checked (the pairwise check is quadratic)."""
    if n > max_checked:
        return np.sort(np.random.default_rng(seed).choice(n, size=max_checked, replace=False))
    return np.arange(n)


def _findings(n: int, idx: np.ndarray, prints: list[np.ndarray], threshold: float,
              min_samples: int) -> SampleFindings:
    """The findings from each input's (2, len(idx), F) fingerprints of the checked samples idx of n."""
    pairs = _duplicate_pairs(prints, threshold)  # (P, 2) positions in idx, earlier first
    later = np.unique(pairs[:, 1]) if len(pairs) else np.empty(0, np.int64)
    examples = tuple((int(idx[i]), int(idx[j])) for i, j in pairs[:3])
    warnings = []
    distinct = len(idx) - len(later)
    if len(later):
        share = "" if len(idx) == n else f" (of {len(idx)} checked)"
        pair = ", ".join(f"{i} and {j}" for i, j in examples[:2])
        warnings.append(f"{len(later)} of {n} calibration samples{share} are near-duplicates of another "
                        f"(cosine > {threshold:g} on a downsampled copy; e.g. samples {pair}); "
                        "they add almost nothing to the fit")
    if n < min_samples or distinct < min_samples <= n:
        count = f"{n} calibration samples" if not len(later) else f"{distinct} distinct calibration samples"
        warnings.append(f"only {count}; the output-aware fit wants a few hundred or more (about 1,000): "
                        "pass more data, or stretch an image set with --augment N")
    return SampleFindings(n, len(idx), int(len(later)), examples, tuple(warnings))


def warn(findings) -> None:
    """Log each warning of a SampleFindings or LayerCheck (the CLI prints `onnxstack: warning: ...`)."""
    lines = findings.warnings if isinstance(findings, SampleFindings) else (findings.reason,)
    for line in lines:
        if line:
            log.warning("%s", f"{findings.name}: {line}" if getattr(findings, "name", "") else line)


def _fingerprints(x: np.ndarray) -> np.ndarray:
    """(2, n, F) unit rows: the area-averaged sample, and the same less its own mean (zero rows for a
    constant sample, to float precision)."""
    x = x.astype(np.float32, copy=False)
    for axis in range(1, x.ndim):
        x = _pool_axis(x, axis, FINGERPRINT_BINS)
    flat = x.reshape(len(x), -1).astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    plain_norm = np.linalg.norm(flat, axis=1, keepdims=True)  # (n, 1)
    centred_norm = np.linalg.norm(centred, axis=1, keepdims=True)
    plain = np.where(plain_norm > 0, flat / np.maximum(plain_norm, 1e-300), 0.0)
    centred = np.where(centred_norm > 1e-5 * plain_norm, centred / np.maximum(centred_norm, 1e-300), 0.0)
    return np.stack([plain, centred]).astype(np.float32)


def _pool_axis(x: np.ndarray, axis: int, bins: int) -> np.ndarray:
    """Average `axis` down to `bins` near-equal runs (unchanged when it is that short already)."""
    size = x.shape[axis]
    if size <= bins:
        return x
    edges = np.linspace(0, size, bins + 1).astype(np.int64)
    sums = np.add.reduceat(x, edges[:-1], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = bins
    return sums / np.diff(edges).reshape(shape).astype(np.float32)


def _duplicate_pairs(prints: list[np.ndarray], threshold: float) -> np.ndarray:
    """(P, 2) index pairs i < j whose similarity exceeds `threshold` for every input; rows in chunks."""
    n = prints[0].shape[1]
    chunk = int(np.clip(_CHUNK_VALUES // max(n, 1), 1, _CHUNK))  # a (chunk, n) similarity of bounded size
    found = []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        sim = None
        for p in prints:
            for form in p:  # plain, centred: the smaller similarity counts
                s = _similarity(form[rows], form)  # (chunk, n)
                sim = s if sim is None else np.minimum(sim, s)
        sim[np.arange(sim.shape[0])[:, None] + start >= np.arange(n)[None, :]] = -np.inf  # keep j > i
        i, j = np.nonzero(sim > threshold)
        found.append(np.stack([i + start, j], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), np.int64)
    return pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]


def _similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of unit rows; 1 between two zero rows (both constant), 0 between a zero and another."""
    sim = a @ b.T
    zero_a, zero_b = ~a.any(1), ~b.any(1)
    return np.where(zero_a[:, None] & zero_b[None, :], 1.0, sim)


# --- one layer --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCheck:
    """Whether the calibration rows pin one layer's weights down; `reason` is None when they do."""

    name: str
    rows: int                 # sampled im2col rows
    features: int             # K = Cg*kh*kw
    constant_features: int    # features that never vary on the data (dead input channels)
    rank: int                 # effective rank of H
    slice_weights: int        # D = d*kh*kw
    weakest_slice: int        # slice with the lowest rank of its block of H
    weakest_slice_rank: int
    weakest_slice_features: int  # that slice's varying features (D, or fewer at a ragged end / dead channels)
    reason: str | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return (self.reason,) if self.reason else ()

    def to_dict(self) -> dict:
        """For the layer's report entry (JSON types only)."""
        return {k: getattr(self, k) for k in ("rows", "features", "constant_features", "rank", "slice_weights",
                                              "weakest_slice", "weakest_slice_rank", "reason")}


def check_layer(stats, d: int, kernel: tuple[int, int], *, name: str = "", rel_tol: float = RANK_TOL) -> LayerCheck:
    """Does the data pin down a layer fitted at slice depth `d` from `stats` (core.calib.LayerStats of its
    im2col rows, K = Cg*kh*kw features)? The reason, when it does not, is one line for the report."""
    kh, kw = (int(kernel[0]), int(kernel[1]))
    D = int(d) * kh * kw
    H = stats.centred_h(np.float64)  # (K, K), the one large array here: the full rank is taken last, in place
    K, n = H.shape[0], int(stats.n)
    scale = _largest_eigenvalue(H)
    live = np.diag(H) > rel_tol * scale  # (K,) features that vary
    slices = [(j, np.arange(j * D, min((j + 1) * D, K))) for j in range(-(-K // D))]
    slice_ranks = []
    for j, f in slices:
        f = f[live[f]]
        slice_ranks.append((_rank(H[np.ix_(f, f)], rel_tol * scale) - len(f), j, len(f)))
    gap, weakest, weakest_live = min(slice_ranks)
    rank = _rank(H, rel_tol * scale, overwrite=True)  # a dead feature's pivot is below tol: never counted
    del H
    check = LayerCheck(name, n, K, int(K - live.sum()), rank, D, weakest, weakest_live + gap, weakest_live)
    return _with_reason(check, d, kh, kw)


def _with_reason(c: LayerCheck, d: int, kh: int, kw: int) -> LayerCheck:
    from dataclasses import replace

    live = c.features - c.constant_features
    weights = f"{c.slice_weights} weights of a slice (d={d} x {kh}x{kw})"
    more = "pass more (or more varied) samples, or stretch an image set with --augment N"
    if c.rows <= c.slice_weights:
        reason = f"{c.rows} calibration rows for the {weights}: the data cannot pin the slices down; {more}"
    elif c.rank < c.slice_weights:
        reason = (f"the calibration inputs span only {c.rank} independent directions, fewer than the {weights}; "
                  f"{more}")
    elif c.rows >= UNDERDETERMINED * c.features:  # the rank gaps below are the network's, not the data's
        return c
    elif c.weakest_slice_rank < c.weakest_slice_features:
        reason = (f"the inputs of slice {c.weakest_slice} span {c.weakest_slice_rank} of its "
                  f"{c.weakest_slice_features} varying features; {more}")
    elif c.rank < live:
        reason = (f"the calibration inputs span {c.rank} of the layer's {live} varying input features "
                  f"({c.rows} rows): {live - c.rank} directions are fitted by damping, not by data; {more}")
    else:
        return c
    return replace(c, reason=reason)


def _largest_eigenvalue(H: np.ndarray, iterations: int = 30) -> float:
    """lambda_max of a PSD matrix by power iteration (K^2 a step); at least its largest diagonal entry."""
    diag = float(np.max(np.diag(H), initial=0.0))
    if diag <= 0:
        return 0.0
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    lam = 0.0
    for _ in range(iterations):
        w = H @ v
        lam = float(np.linalg.norm(w))
        if lam == 0:
            break
        v = w / lam
    return max(lam, diag)


def _rank(H: np.ndarray, tol: float, overwrite: bool = False) -> int:
    """Pivots of a pivoted Cholesky above `tol` (LAPACK dpstrf; scipy comes with scikit-learn). A symmetric
    C-ordered H is its own Fortran-ordered transpose: with overwrite, factored in place, no copy."""
    if H.size == 0:
        return 0
    from scipy.linalg import lapack

    a = H.T if overwrite and H.dtype == np.float64 and H.flags.c_contiguous else np.array(H, np.float64, order="F")
    _, _, rank, info = lapack.dpstrf(a, lower=0, tol=tol, overwrite_a=1)
    return int(rank) if info >= 0 else int(np.linalg.matrix_rank(np.array(H, np.float64), tol=tol))
