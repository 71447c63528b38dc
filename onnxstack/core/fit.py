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
The codebook starts from sign(k-means centroids) of the normalised slices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

F16_MAX = float(np.finfo(np.float16).max)


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
        scales = np.broadcast_to(self.scales, self.indices.shape)
        return np.einsum("nsq,nsqd->nsd", scales, self.codebook[self.indices].astype(np.float32))


def to_slices(weight: np.ndarray, d: int) -> np.ndarray:
    """(N, C, kh, kw) -> (N, s, d*kh*kw), zero-padding C up to s*d."""
    N, C, kh, kw = weight.shape
    s = -(-C // d)
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
    X = np.ascontiguousarray(slices.reshape(N * s, D), dtype=np.float32)  # (n, D)
    n = X.shape[0]
    if not 2 <= m <= n:
        raise ValueError(f"codebook size m={m} must be in [2, {n}] (slices={n})")
    if scale not in ("slice", "filter"):
        raise ValueError(f"scale must be 'slice' or 'filter', got {scale!r}")
    rng = np.random.default_rng(seed)
    B = _init_codebook(X, m, rng)  # (m, D) float32 +-1
    best = None
    for _ in range(max(iterations, 1)):
        idx, alpha = _assign(X, B, N, s, scale, terms)
        err = _error(X, B, idx, alpha)
        if best is None or err < best[0] - 1e-12 * max(best[0], 1.0):
            best = (err, B.copy(), idx, alpha)
        else:
            break
        B = _update(X, B, idx, alpha, rng)
    _, B, idx, alpha = best
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


def _init_codebook(X: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """sign of k-means centroids of sign-canonical, unit-norm slices (on a subsample)."""
    from sklearn.cluster import KMeans

    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.where(norms > 0, norms, 1.0)
    # +-w need the same codeword (the scale carries the sign): flip so the first
    # principal direction has a positive projection
    _, _, vt = np.linalg.svd(Xn[: min(len(Xn), 4096)], full_matrices=False)
    Xn = Xn * np.where(Xn @ vt[0] < 0, -1.0, 1.0)[:, None]
    sample = min(len(Xn), max(16 * m, 2048))
    pick = rng.choice(len(Xn), size=sample, replace=False) if sample < len(Xn) else np.arange(len(Xn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points -> fewer distinct clusters: reseeded later
        km = KMeans(n_clusters=m, n_init=1, max_iter=30, random_state=int(rng.integers(2**31)))
        km.fit(Xn[pick])
    return np.where(km.cluster_centers_ >= 0, 1.0, -1.0).astype(np.float32)


def _assign(X, B, N, s, scale, terms):
    """Codewords (n, k) and scales (n, k) of every slice: greedy on the residual, then joint scales."""
    n, D = X.shape
    rows = np.arange(n)
    idx = np.zeros((n, terms), np.int64)
    alpha = np.zeros((n, terms), np.float32)
    R = X.copy()
    for q in range(terms):
        corr = R @ B.T  # (n, m)
        if scale == "slice":
            idx[:, q] = np.abs(corr).argmax(axis=1)
            alpha[:, q] = corr[rows, idx[:, q]] / D
        else:
            idx[:, q] = corr.argmax(axis=1)
            alpha[:, q] = np.repeat(corr[rows, idx[:, q]].reshape(N, s).sum(axis=1) / (s * D), s)
        R -= alpha[:, q:q + 1] * B[idx[:, q]]
    if terms > 1 and scale == "slice":
        Z = B[idx]  # (n, k, D)
        gram = np.einsum("nqd,nrd->nqr", Z, Z) + 1e-6 * np.eye(terms)
        alpha = np.linalg.solve(gram, np.einsum("nqd,nd->nq", Z, X)[..., None])[..., 0].astype(np.float32)
    return idx, _to_float16_range(alpha)  # fit what will be stored


def _error(X, B, idx, alpha) -> float:
    return float(np.sum((X - np.einsum("nq,nqd->nd", alpha, B[idx])) ** 2))


def _update(X, B, idx, alpha, rng) -> np.ndarray:
    """B_t = sign(sum alpha * (w - other terms)) over its uses; unused codewords take the worst slices."""
    m = B.shape[0]
    n, terms = idx.shape
    approx = np.einsum("nq,nqd->nd", alpha, B[idx])  # (n, D)
    acc = np.zeros_like(B, dtype=np.float64)
    for q in range(terms):  # k is 1..4
        target = X - approx + alpha[:, q:q + 1] * B[idx[:, q]]
        onehot = sp.csr_matrix((alpha[:, q], (idx[:, q], np.arange(n))), shape=(m, n))
        acc += np.asarray(onehot @ target)
    newB = np.where(acc > 0, 1.0, np.where(acc < 0, -1.0, B)).astype(np.float32)
    counts = np.bincount(idx.ravel(), minlength=m)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        resid = np.sum((X - approx) ** 2, axis=1)
        worst = np.argsort(-resid, kind="stable")[: len(empty)]
        newB[empty[: len(worst)]] = np.where(X[worst] >= 0, 1.0, -1.0)
    return newB


def _to_float16_range(alpha: np.ndarray) -> np.ndarray:
    """Clip to what float16 holds; values stay float32 for the math."""
    return np.clip(alpha, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)
