"""Fitting a shared binary codebook to the channel slices of one Conv weight.

A weight W (N, C, kh, kw) is cut along C into s = ceil(C / d) slices of D = d*kh*kw weights
(the last one zero-padded). Each slice w_ij is replaced by alpha_ij * B_pi(ij) with B_t in
{-1,+1}^D, t < m. The fit minimises

    E = sum_ij || w_ij - alpha_ij * B_pi(ij) ||^2

by alternating closed-form steps, like k-means with binary centroids:
  assign  pi = argmax_t |<w, B_t>|          (per-slice scales carry the sign)
          pi = argmax_t  <w, B_t>           (per-filter scales)
  scale   alpha = <w, B_pi> / D             (least squares, per slice)
          alpha_i = sum_j <w_ij, B_pi> / (s D)  (per filter)
  update  B_t = sign(sum_{pi(ij)=t} alpha_ij w_ij), empty codewords reseeded from the worst slices.
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
    """Result of one layer's fit. Shapes: codebook (m, D) int8 +-1, indices (N, s) int64,
    scales (N, s) for per-slice scales or (N, 1) per filter, float32 values that float16 holds."""

    codebook: np.ndarray
    indices: np.ndarray
    scales: np.ndarray

    def decode(self) -> np.ndarray:
        """(N, s, D) float32: alpha_ij * B_pi(ij)."""
        return self.codebook[self.indices].astype(np.float32) * self.scales[:, :, None]


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
) -> BinaryFit:
    """Fit m binary codewords to slices (N, s, D) in weight space (see module docstring)."""
    N, s, D = slices.shape
    X = np.ascontiguousarray(slices.reshape(N * s, D), dtype=np.float32)  # (n, D)
    n = X.shape[0]
    if not 2 <= m <= n:
        raise ValueError(f"codebook size m={m} must be in [2, {n}] (slices={n})")
    rng = np.random.default_rng(seed)
    B = _init_codebook(X, m, rng)  # (m, D) float32 +-1
    best = None
    for _ in range(max(iterations, 1)):
        idx, alpha = _assign(X, B, N, s, scale)
        err = _error(X, B, idx, alpha)
        if best is None or err < best[0] - 1e-12 * max(best[0], 1.0):
            best = (err, B.copy(), idx, alpha)
        else:
            break
        B = _update(X, B, idx, alpha, rng)
    _, B, idx, alpha = best
    alpha = alpha.reshape(N, s)
    return BinaryFit(
        codebook=B.astype(np.int8),
        indices=idx.reshape(N, s).astype(np.int64),
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


def _assign(X, B, N, s, scale):
    """Best codeword and least-squares scale for every slice."""
    D = X.shape[1]
    corr = X @ B.T  # (n, m)
    rows = np.arange(len(X))
    if scale == "slice":
        idx = np.abs(corr).argmax(axis=1)
        alpha = corr[rows, idx] / D  # (n,)
    elif scale == "filter":
        idx = corr.argmax(axis=1)
        per_filter = corr[rows, idx].reshape(N, s).sum(axis=1) / (s * D)  # (N,)
        alpha = np.repeat(per_filter, s)
    else:
        raise ValueError(f"scale must be 'slice' or 'filter', got {scale!r}")
    return idx, _to_float16_range(alpha)  # fit what will be stored


def _error(X, B, idx, alpha) -> float:
    return float(np.sum((X - alpha[:, None] * B[idx]) ** 2))


def _update(X, B, idx, alpha, rng) -> np.ndarray:
    """B_t = sign(sum alpha w) over its slices; empty codewords take the worst-fit slices."""
    m = B.shape[0]
    n = len(X)
    onehot = sp.csr_matrix((alpha, (idx, np.arange(n))), shape=(m, n))
    acc = np.asarray(onehot @ X)  # (m, D)
    newB = np.where(acc > 0, 1.0, np.where(acc < 0, -1.0, B)).astype(np.float32)
    counts = np.bincount(idx, minlength=m)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        resid = np.sum((X - alpha[:, None] * B[idx]) ** 2, axis=1)
        worst = np.argsort(-resid, kind="stable")[: len(empty)]
        newB[empty[: len(worst)]] = np.where(X[worst] >= 0, 1.0, -1.0)
    return newB


def _to_float16_range(alpha: np.ndarray) -> np.ndarray:
    """Clip to what float16 holds; values stay float32 for the math."""
    return np.clip(alpha, -F16_MAX, F16_MAX).astype(np.float16).astype(np.float32)
