"""Symmetric per-output-channel integer weights (pure numpy): the int8 / int4 representation of a layer.

A Conv weight W (N, K = Cg*kh*kw) is stored as integers q (N, K) and one scale a channel,
W_hat[i] = s_i * q[i], q in [QMIN, QMAX] (int8: [-127, 127]; int4: [-8, 7]); zero point 0.

- weights only (`quantize_weights`): round to nearest, s_i = r * max|W_i| / QMAX with the clipping ratio r
  of CLIP_RATIOS that minimises ||W_i - W_hat_i||^2, per channel.
- output-aware (`quantize_output_aware`, GPTQ-style) from calibration statistics (core.calib.LayerStats):
  minimise ||Xc (W_hat - W*)^T||^2 = sum_i (W_hat_i - W*_i) H (W_hat_i - W*_i)^T with H = Xc^T Xc,
  W* = argmin ||Xc w^T - Yc||^2 + lam ||w - W||^2 = W + (H + lam I)^-1 (G - H W)^T, G = Xc^T Yc: the weight that
  best maps the layer's current inputs to the original outputs (so the error of earlier compressed layers is
  corrected), W itself when the inputs are the original ones; the ridge lam (damp * mean diag H) pulls it
  toward W, not toward zero, so an int8 fit is not biased by the damping. Columns are rounded in order; each rounding error e_j
  is pushed onto the columns not yet rounded through the upper Cholesky factor U of H^-1
  (W[:, j+1:] -= e_j / U_jj * U[j, j+1:]). Channels are independent, so every clipping ratio is tried and
  each channel keeps the one with the least H-error. Then each channel gets the least-squares gain against
  the original outputs (folded into s_i) and the bias that matches their mean, as core.calib does.
"""

from __future__ import annotations

import numpy as np

from .calib import LayerStats, _quad, _safe_inverse, apply_inverse

QRANGE = {8: (-127, 127), 4: (-8, 7)}  # stored integer range by bit width (symmetric scale: max |w| -> 127 or 7)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
BLOCK = 128  # columns a GPTQ block (the lazy batch update)


def qrange(bits: int) -> tuple[int, int]:
    if bits not in QRANGE:
        raise ValueError(f"integer weights are 4 or 8 bits, got bits={bits}")
    return QRANGE[bits]


def decode(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W_hat = q * s, per output channel (axis 0): q (N, ...), scales (N,) -> float32, q's shape."""
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q.astype(np.float32) * scales.astype(np.float32).reshape(shape)).astype(np.float32)


def _round(w: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """clip(round(w / s)) for w (N, ...) and s (N, 1...) (s > 0)."""
    lo, hi = qrange(bits)
    return np.clip(np.rint(w / s), lo, hi)


def _base_scale(w2: np.ndarray, bits: int) -> np.ndarray:
    """max |W_i| / QMAX per channel (N,), 1 where a channel is all zero (it stores zeros)."""
    amax = np.abs(w2).max(axis=1)
    return np.where(amax > 0, amax / qrange(bits)[1], 1.0)


def quantize_weights(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest of weight (N, ...) with per-channel clipping by weight MSE -> (q int8 (N, ...), scales (N,))."""
    n = weight.shape[0]
    w2 = weight.reshape(n, -1).astype(np.float64)  # (N, K)
    base = _base_scale(w2, bits)
    best_err, best_s = np.full(n, np.inf), base.copy()
    for r in CLIP_RATIOS:
        s = r * base
        err = ((_round(w2, s[:, None], bits) * s[:, None] - w2) ** 2).sum(axis=1)
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    s = best_s.astype(np.float32)
    q = _round(w2, s[:, None].astype(np.float64), bits)
    return q.astype(np.int8).reshape(weight.shape), s


def gptq_columns(wstar: np.ndarray, U: np.ndarray, s: np.ndarray, bits: int, block: int = BLOCK) -> np.ndarray:
    """Integers (N, K) for target wstar (N, K) with scales s (N,), columns in order, the rounding error of
    each fed forward through U (K, K), the upper Cholesky factor of H^-1. Loops over columns only."""
    W = wstar.copy()
    n, K = W.shape
    Q = np.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, E1, U1 = W[:, i1:i2].copy(), np.zeros((n, i2 - i1)), U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            q = _round(W1[:, j], s, bits)  # (N,)
            Q[:, i1 + j] = q
            e = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j + 1:] -= np.outer(e, U1[j, j + 1:])
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


def quantize_output_aware(weight: np.ndarray, stats: LayerStats, bits: int, damp: float = 0.01,
                          correct: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ-style fit of weight (N, Cg, kh, kw) on calibration statistics (module docstring)
    -> (q int8 (N, Cg, kh, kw), scales (N,) float32, new bias (N,) float32)."""
    n = weight.shape[0]
    mx, H, G, my = stats.centred()  # (K,), (K, K), (K, N), (N,)
    K = H.shape[0]
    if K != weight[0].size or G.shape[1] != n:
        raise ValueError(f"stats are for K={K}, N={G.shape[1]}; weight.shape={weight.shape}")
    Hd = H + np.eye(K) * damp * max(float(np.mean(np.diag(H))), 1e-12)
    Hd, U = _safe_inverse(Hd)
    w0 = weight.reshape(n, K).astype(np.float64)
    wstar = w0 + apply_inverse(U, G - H @ w0.T).T  # (N, K): the ridge pulls toward the original weight, not to zero
    base = _base_scale(wstar, bits)
    best_err, best_s, best_q = np.full(n, np.inf), base.copy(), np.zeros((n, K))
    for r in CLIP_RATIOS:
        s = r * base
        q = gptq_columns(wstar, U, s, bits)
        err = _quad(q * s[:, None] - wstar, Hd)  # (N,) output error of each channel
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
        best_q[better] = q[better]
    s = best_s
    if correct:  # per-channel least-squares gain: min_g || g Xc w_hat_i - Yc_i ||^2, folded into the scale
        what = best_q * s[:, None]
        num, den = np.einsum("nk,kn->n", what, G), _quad(what, H)
        gain = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        s = np.where(gain > 0, s * gain, s)  # a scale stays positive (a flipped channel keeps its fit)
    s = s.astype(np.float32)
    what = best_q * s[:, None].astype(np.float64)
    bias = my - what @ mx  # exact for the centred objective
    return best_q.astype(np.int8).reshape(weight.shape), s, bias.astype(np.float32)

