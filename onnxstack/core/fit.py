"""Fitting a shared binary codebook to the channel slices of one Conv weight.

A weight W (N, C, kh, kw) is cut along C into s = ceil(C / d) slices of D = d*kh*kw weights
(the last one zero-padded). Each slice w_ij is replaced by alpha_ij * B_pi(ij) with B_t in
{-1,+1}^D, t < m (or, with k stacked terms, by sum_q alpha_ijq B_pi(ijq)). The fit minimises

    E = sum_ij || w_ij - sum_q alpha_ijq * B_pi(ijq) ||^2

by alternating closed-form steps, like k-means with binary centroids:
  assign  pi = argmax_t |<w, B_t>|          (per-slice scales carry the sign)
          pi = argmax_t  <w, B_t>           (per-filter scales)
  scale   alpha = <w, B_pi> / D             (least squares, per slice)
          alpha_i = sum_j <w_ij, B_pi> / (s D)  (per filter)
  update  B_t = sign(sum_{pi(ij)=t} alpha_ij w_ij), empty codewords reseeded from the worst slices.
With k > 1 terms the assignment is greedy on the residual, then the k scales of a slice are
solved jointly (least squares); each term's codeword update uses the slice minus its other terms.
The steps stop when E improves by less than a fraction TOLERANCE, or after `iterations`.

The codebook starts from sign(k-means centroids) of the normalised, sign-canonical slices
(k-means++ seeds, a few Lloyd steps, on at most KMEANS_PER_CODEWORD slices a codeword).

Cost: one assignment is an (n, D) x (D, m) product for n = N*s slices, m*D multiply-adds a
slice. A layer with more than 2 * SAMPLE_PER_CODEWORD slices a codeword is therefore fitted on a
seeded subsample of whole filters (whole, so per-filter scales stay exact), then every slice is
assigned once to the result. Large temporaries live in reused buffers: a fresh multi-megabyte
array costs page faults that are dearer than the arithmetic done in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

F16_MAX = float(np.finfo(np.float16).max)
TOLERANCE = 1e-3  # stop when E improves by less than this fraction
SAMPLE_PER_CODEWORD = 16  # slices a codeword in the subsample fit of large layers
KMEANS_PER_CODEWORD = 16  # slices a codeword in the k-means (at least KMEANS_MIN)
KMEANS_SEED_PER_CODEWORD = 2  # k-means++ seeds are drawn from this many slices a codeword (at least KMEANS_MIN)
KMEANS_MIN = 512
KMEANS_ITERATIONS = 1  # Lloyd steps after the seeding (the binary steps that follow refine further)
SEED_MATRIX_MAX = 4096  # k-means++ keeps a full distance matrix up to this many points
CHUNK_ELEMENTS = 1 << 20  # entries of the (rows, m) correlation computed at once


@dataclass(frozen=True)
class BinaryFit:
    """Result of one layer's fit. Shapes: codebook (m, D) int8 +-1, indices (N, s, k) int64,
    scales (N, s, k) for per-slice scales or (N, 1, k) per filter, float32 values that float16 holds."""

    codebook: np.ndarray
    indices: np.ndarray
    scales: np.ndarray

    @property
    def terms(self) -> int:
        return self.indices.shape[2]

    def decode(self) -> np.ndarray:
        """(N, s, D) float32: sum_q alpha_ijq * B_pi(ijq)."""
        return decode(self.codebook.astype(np.float32), self.indices, self.scales)


def decode(codebook: np.ndarray, indices: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The one decode of a stacked binary weight: (N, s, D) = sum_q scales[n, s, q] * codebook[indices[n, s, q]].

    codebook (m, D) of +-1 values, indices (N, s, k), scales (N, s, k) or (N, 1, k) (per filter); the
    result has the dtype of codebook and scales. The torch bridge's decode is proven equal to this one."""
    scales = np.broadcast_to(scales, indices.shape)
    return np.einsum("nsq,nsqd->nsd", scales, codebook[indices])


def slice_depth(d: int, channels: int) -> int:
    """The slice depth a layer with `channels` input channels (a group) gets: d, or all of its channels
    when it has fewer (an RGB or 1-channel stem: one slice a filter, across its kernel window)."""
    return min(d, channels)


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive integers (slices of a layer: ceil_div(channels, d))."""
    return -(-a // b)


def to_slices(weight: np.ndarray, d: int) -> np.ndarray:
    """(N, C, kh, kw) -> (N, s, d*kh*kw), zero-padding C up to s*d."""
    N, C, kh, kw = weight.shape
    s = ceil_div(C, d)
    padded = np.zeros((N, s * d, kh, kw), dtype=np.float32)
    padded[:, :C] = weight
    return padded.reshape(N, s, d * kh * kw)


def from_slices(slices: np.ndarray, channels: int, kernel: tuple[int, int]) -> np.ndarray:
    """(N, s, D) -> (N, channels, kh, kw), dropping the padding channels."""
    N = slices.shape[0]
    return slices.reshape(N, -1, *kernel)[:, :channels]


def fit_binary_codebook(
    slices: np.ndarray,
    m: int,
    *,
    scale: str = "slice",
    iterations: int = 20,
    seed: int = 0,
    terms: int = 1,
) -> BinaryFit:
    """Fit m binary codewords to slices (N, s, D) in weight space (see module docstring)."""
    N, s, D = slices.shape
    n = N * s
    if not 2 <= m <= n:
        raise ValueError(f"codebook size m={m} must be in [2, {n}] (slices={n})")
    if scale not in ("slice", "filter"):
        raise ValueError(f"scale must be 'slice' or 'filter', got {scale!r}")
    slices = np.ascontiguousarray(slices, dtype=np.float32)
    rng = np.random.default_rng(seed)
    scratch = _Scratch()
    with one_blas_thread():
        filters = _sample_filters(N, s, SAMPLE_PER_CODEWORD * m, rng)  # None: all
        sub = slices if filters is None else slices[filters]  # (N', s, D)
        B = _init_codebook(sub.reshape(-1, D), m, rng, scratch)  # (m, D) float32 +-1
        if filters is not None:  # fitted on the subsample, then every slice assigned once
            B = _alternate(sub, B, scale, terms, iterations, scratch)[0]
            iterations = 1
        B, idx, alpha = _alternate(slices, B, scale, terms, iterations, scratch)
    alpha = alpha.reshape(N, s, terms)
    return BinaryFit(
        codebook=B.astype(np.int8),
        indices=idx.reshape(N, s, terms).astype(np.int64),
        scales=alpha if scale == "slice" else alpha[:, :1],
    )


def relative_error(weight_slices: np.ndarray, fit: BinaryFit) -> float:
    """||W - W_hat|| / ||W|| over the slices (with float16 scales)."""
    diff = weight_slices - fit.decode()
    norm = float(np.linalg.norm(weight_slices))
    return float(np.linalg.norm(diff)) / norm if norm > 0 else 0.0


def one_blas_thread():
    """Keep BLAS to one thread during the fit (as scikit-learn's k-means does): its products are
    many and mid-sized, and OpenBLAS's second thread spins between them; with any other load on
    2 cores that doubled the wall time of compressing ResNet-50 (measured, bench/compress_speed.py)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class _Scratch:
    """Named buffers reused across the steps of one fit."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self.buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.buffers[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


def _alternate(slices, B, scale, terms, iterations, scratch):
    """Assign / scale / update steps from codebook B until E stops improving; the best (B, idx, alpha)."""
    N, s, D = slices.shape
    X = slices.reshape(N * s, D)  # (n, D)
    steps = max(iterations, 1)
    best, prev = None, None
    for step in range(steps):
        idx, alpha, err = _assign(X, B, N, s, scale, terms, scratch)
        if best is None or err < best[0]:
            best = (err, B, idx, alpha)
        if step == steps - 1 or (prev is not None and err > prev * (1 - TOLERANCE)):
            break
        prev = err
        B = _update(X, B, idx, alpha, scratch)
    return best[1], best[2], best[3]


def _sample_filters(N: int, s: int, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of ceil(size / s) filters, or None where that is more than half of them."""
    keep = ceil_div(size, s)
    if 2 * keep > N:
        return None
    return np.sort(rng.choice(N, size=keep, replace=False))


def _init_codebook(X: np.ndarray, m: int, rng: np.random.Generator, scratch: "_Scratch") -> np.ndarray:
    """sign of k-means centroids of sign-canonical, unit-norm slices (on a subsample)."""
    n, D = X.shape
    size = min(n, max(KMEANS_PER_CODEWORD * m, KMEANS_MIN))
    P = X[rng.permutation(n)[:size]]  # (p, D), in random order
    norms = np.linalg.norm(P, axis=1, keepdims=True)
    P /= np.where(norms > 0, norms, 1.0)
    # +-w need the same codeword (the scale carries the sign): flip so the first principal
    # direction has a positive projection, oriented to flip the fewest slices (per-filter
    # scales cannot flip the sign of one slice)
    proj = P @ _principal_direction(P)
    if np.count_nonzero(proj < 0) > len(proj) // 2:
        proj = -proj
    P[proj < 0] *= -1
    C = _kmeans(P, m, rng, scratch)
    return np.where(C >= 0, 1.0, -1.0).astype(np.float32)


def _principal_direction(P: np.ndarray, steps: int = 30) -> np.ndarray:
    """Leading eigenvector of P^T P (D,) by power iteration; it only needs to be roughly right."""
    gram = (P.T @ P).astype(np.float64)  # (D, D)
    v = gram.sum(axis=1) + 1e-3  # deterministic start
    for _ in range(steps):
        v = gram @ v
        v /= max(float(np.linalg.norm(v)), 1e-300)
    return v.astype(np.float32)


def _kmeans(P: np.ndarray, m: int, rng: np.random.Generator, scratch: "_Scratch") -> np.ndarray:
    """Centroids (m, D) of the rows of P (p, D, random order): k-means++ seeds from its first rows,
    then Lloyd steps until the labels settle or KMEANS_ITERATIONS."""
    C = _kmeanspp(P[:max(KMEANS_SEED_PER_CODEWORD * m, KMEANS_MIN)], m, rng)
    labels = None
    for _ in range(KMEANS_ITERATIONS):
        # nearest centroid: argmax_t <p, c_t> - |c_t|^2 / 2
        new, _ = _best_codeword(P, C, scratch, bias=-0.5 * np.einsum("md,md->m", C, C))
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums, counts = _segment_sum(labels, P, m, scratch)
        C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C).astype(np.float32)
    return C


def _kmeanspp(P: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (m, D) from the rows of P (p, D), as scikit-learn draws them: of
    2 + log(m) candidates drawn with probability proportional to the squared distance to the seeds
    so far, keep the one that lowers the sum of those distances most."""
    p = len(P)
    sq = np.einsum("pd,pd->p", P, P)  # float32, as P: the distances only rank candidates

    def dist(rows, out=None):  # (len(rows), p) squared distances
        d = sq[rows, None] + sq[None, :] - 2 * (P[rows] @ P.T)
        return np.maximum(d, 0, out=d if out is None else out)

    full = dist(np.arange(p)) if p <= SEED_MATRIX_MAX else None
    trials = 2 + int(np.log(m))
    draws = rng.random((m, trials))
    cand_dist = np.empty((trials, p), sq.dtype)
    seeds = np.empty(m, np.int64)
    seeds[0] = rng.integers(p)
    closest = dist(seeds[:1])[0].copy()
    for t in range(1, m):
        cum = closest.cumsum()
        if cum[-1] <= 0:  # fewer distinct points than m: the rest are duplicates
            seeds[t:] = rng.choice(p, size=m - t)
            break
        cands = np.minimum(cum.searchsorted(draws[t] * cum[-1], side="right"), p - 1)
        if full is not None:
            np.take(full, cands, axis=0, out=cand_dist)
        else:
            dist(cands, out=cand_dist)
        np.minimum(cand_dist, closest, out=cand_dist)  # (trials, p)
        best = cand_dist.sum(axis=1).argmin()
        seeds[t] = cands[best]
        closest[:] = cand_dist[best]
    return P[seeds].copy()


def _segment_sum(labels: np.ndarray, V: np.ndarray, m: int, scratch: "_Scratch") -> tuple[np.ndarray, np.ndarray]:
    """Sums of the rows of V (n, D) by label in [0, m), float64 (m, D), and the counts (m,)."""
    counts = np.bincount(labels, minlength=m)
    present = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts[present])[:-1]))
    ordered = np.take(V, np.argsort(labels, kind="stable"), axis=0, out=scratch.get("ordered", V.shape, V.dtype))
    sums = np.zeros((m, V.shape[1]))
    sums[present] = np.add.reduceat(ordered, starts, axis=0, dtype=np.float64)
    return sums, counts


def _assign(X, B, N, s, scale, terms, scratch):
    """Codewords (n, k), scales (n, k) of every slice and the error E: greedy on the residual, then
    joint scales."""
    n, D = X.shape
    absolute = scale == "slice"
    if terms == 1:
        idx, corr = _best_codeword(X, B, scratch, absolute=absolute)
        alpha = _to_float16_range(_scales(corr, N, s, D, scale))  # fit what will be stored
        # ||w - a b||^2 = |w|^2 - 2 a <w, b> + a^2 D
        err = (np.einsum("nd,nd->", X, X, dtype=np.float64) - 2 * np.dot(alpha, corr.astype(np.float64))
               + D * np.dot(alpha, alpha.astype(np.float64)))
        return idx[:, None], alpha[:, None], max(float(err), 0.0)
    idx = np.zeros((n, terms), np.int64)
    alpha = np.zeros((n, terms), np.float32)
    R = X.copy()
    for q in range(terms):
        idx[:, q], corr = _best_codeword(R, B, scratch, absolute=absolute)
        alpha[:, q] = _scales(corr, N, s, D, scale)
        R -= alpha[:, q:q + 1] * B[idx[:, q]]
    if scale == "slice":
        Z = B[idx]  # (n, k, D)
        gram = np.einsum("nqd,nrd->nqr", Z, Z) + 1e-6 * np.eye(terms)
        rhs = np.einsum("nqd,nd->nq", Z, X)[..., None]
        try:
            alpha = np.linalg.solve(gram, rhs)[..., 0].astype(np.float32)
        except np.linalg.LinAlgError:  # a slice whose terms repeat one codeword: least squares
            alpha = (np.linalg.pinv(gram) @ rhs)[..., 0].astype(np.float32)
    alpha = _to_float16_range(alpha)
    return idx, alpha, _error(X, B, idx, alpha)


def _scales(corr: np.ndarray, N: int, s: int, D: int, scale: str) -> np.ndarray:
    """Least-squares scales (n,) from the correlations (n,) with the chosen codewords."""
    if scale == "slice":
        return corr / D
    return np.repeat(corr.reshape(N, s).sum(axis=1) / (s * D), s)


def _best_codeword(X: np.ndarray, B: np.ndarray, scratch: "_Scratch", *, absolute: bool = False,
                   bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every row x of X (n, D): t = argmax_t <x, B_t> + bias_t (or |<x, B_t>|), and <x, B_t>."""
    n, m = len(X), len(B)
    rows = max(1, min(n, CHUNK_ELEMENTS // m))
    BT = np.ascontiguousarray(B.T)  # (D, m)
    idx = np.empty(n, np.int64)
    best = np.empty(n, np.float32)
    for a in range(0, n, rows):
        chunk = X[a:a + rows]
        k = len(chunk)
        corr = np.matmul(chunk, BT, out=scratch.get("corr", (k, m)))  # (k, m)
        if bias is not None:
            corr += bias
        if absolute:  # the largest |<x, B_t>|: the largest or the most negative
            pick = np.abs(corr, out=scratch.get("abs", (k, m))).argmax(axis=1)
        else:
            pick = corr.argmax(axis=1)
        value = corr[np.arange(k), pick]
        idx[a:a + k] = pick
        best[a:a + k] = value if bias is None else value - bias[pick]
    return idx, best


def _error(X, B, idx, alpha) -> float:
    return float(np.sum((X - np.einsum("nq,nqd->nd", alpha, B[idx])) ** 2))


def _update(X, B, idx, alpha, scratch) -> np.ndarray:
    """B_t = sign(sum alpha * (w - other terms)) over its uses; unused codewords take the worst slices."""
    m = B.shape[0]
    n, terms = idx.shape
    if terms == 1:
        approx = None
        acc, counts = _segment_sum(idx[:, 0], np.multiply(alpha, X, out=scratch.get("weighted", X.shape)), m, scratch)
    else:
        approx = np.einsum("nq,nqd->nd", alpha, B[idx])  # (n, D)
        acc = np.zeros(B.shape)
        for q in range(terms):  # k is 1..4
            target = X - approx + alpha[:, q:q + 1] * B[idx[:, q]]
            acc += _segment_sum(idx[:, q], alpha[:, q:q + 1] * target, m, scratch)[0]
        counts = np.bincount(idx.ravel(), minlength=m)
    newB = np.where(acc > 0, 1.0, np.where(acc < 0, -1.0, B)).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        if approx is None:
            approx = alpha * B[idx[:, 0]]
        resid = np.sum((X - approx) ** 2, axis=1)
        worst = np.argsort(-resid, kind="stable")[: len(empty)]
        newB[empty[: len(worst)]] = np.where(X[worst] >= 0, 1.0, -1.0)
    return newB


def _to_float16_range(alpha: np.ndarray) -> np.ndarray:
    """Clip to what float16 holds; values stay float32 for the math."""
    return np.clip(alpha, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)
