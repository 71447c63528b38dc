"""Output-aware fitting of one Conv from calibration statistics (pure numpy).

For a Conv with weight W (N, K = Cg*kh*kw as rows of im2col features), calibration gives sampled
im2col rows X of the layer's *current* input (earlier layers already compressed) and the *original*
layer's outputs Y at the same positions. The fit minimises the output error

    || X W_hat^T + b - Y ||^2  =  || W_hat - W* ||_H^2 + const,   H = Xc^T Xc (centred), W* = H^-1 Xc^T Yc,

so accumulated error from earlier layers is corrected, not just preserved. The binary structure is
fitted GPTQ-style: slice positions j = 0..s-1 in turn, each filter's slice picks the codeword and scale
that are best under the conditional metric of the features not yet fixed, and the error is pushed
onto the later slices through the Cholesky factor U of H^-1 (H^-1 = U^T U). The codebook is then
re-estimated from the targets, and the pass repeated. Finally each output channel gets the
least-squares gain and the bias that match the original outputs (statistics correction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conv import resolve_pads
from .fit import F16_MAX, BinaryFit, _to_float16_range, ceil_div, decode, fit_binary_codebook, to_slices


def output_size(in_hw, kernel, strides, pads, dilations):
    return tuple((size + pads[i] + pads[i + 2] - ((k - 1) * dl + 1)) // st + 1
                 for i, (size, k, st, dl) in enumerate(zip(in_hw, kernel, strides, dilations)))


def im2col_rows(x: np.ndarray, positions: np.ndarray, kernel, strides=None, pads=None, dilations=None,
                auto_pad="NOTSET") -> np.ndarray:
    """Sampled im2col rows: x (B, C, H, W), positions (B, P) flat output indices -> (B*P, C*kh*kw).

    Gathered from x itself (no padded copy of the batch): taps that fall in the padding read a clipped
    pixel and are zeroed."""
    B, C, H, W = x.shape
    kh, kw = kernel
    strides, dilations = list(strides or [1, 1]), list(dilations or [1, 1])
    p = resolve_pads((H, W), kernel, strides, dilations, pads, auto_pad)
    _, wo = output_size((H, W), kernel, strides, p, dilations)
    r = (positions // wo * strides[0] - p[0])[..., None] + np.arange(kh) * dilations[0]  # (B, P, kh) rows of x
    c = (positions % wo * strides[1] - p[1])[..., None] + np.arange(kw) * dilations[1]   # (B, P, kw) columns
    b = np.arange(B)[:, None, None, None]
    taps = x[b, :, np.clip(r, 0, H - 1)[..., None], np.clip(c, 0, W - 1)[..., None, :]]  # (B, P, kh, kw, C)
    inside = ((r >= 0) & (r < H))[..., None] & ((c >= 0) & (c < W))[..., None, :]
    if not inside.all():
        taps = taps * inside[..., None].astype(taps.dtype)
    return taps.transpose(0, 1, 4, 2, 3).reshape(B * positions.shape[1], C * kh * kw)


FIT_DTYPE = np.float32  # the metric's H, its factor U and W*: BLAS-3 in single precision, as GPTQ does
_BLOCK = 1024  # rows of H centred at a time (the float64 sums are cast block by block)


@dataclass
class LayerStats:
    """Running sums over sampled rows of X (current input, K features) and Y (original output, N)."""

    n: int
    sx: np.ndarray   # (K,)
    sxx: np.ndarray  # (K, K)
    sy: np.ndarray   # (N,)
    sxy: np.ndarray  # (K, N)
    syy: np.ndarray  # (N,)

    @classmethod
    def empty(cls, K: int, N: int) -> "LayerStats":
        z = np.zeros
        return cls(0, z(K), z((K, K)), z(N), z((K, N)), z(N))

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Add a batch of rows; products in float32 (one batch), sums kept in float64."""
        X, Y = np.ascontiguousarray(X, np.float32), np.ascontiguousarray(Y, np.float32)
        self.n += len(X)
        self.sx += X.sum(0, dtype=np.float64)
        self.sxx += X.T @ X
        self.sy += Y.sum(0, dtype=np.float64)
        self.sxy += X.T @ Y
        self.syy += (Y * Y).sum(0, dtype=np.float64)

    def absorb(self, other: "LayerStats") -> "LayerStats":
        """These stats become those of both sets of rows (in place: a (K, K) float64 sum is 170 MB at K = 4608,
        and a merged copy beside both parts was the walk's peak on ResNet-50); returns self."""
        self.n += other.n
        for name in ("sx", "sxx", "sy", "sxy", "syy"):
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def relative_error(self, w: np.ndarray, b: np.ndarray) -> float:
        """sum ||X w^T + b - Y||^2 / sum ||Y - mean(Y)||^2 over the rows, for w (N, K), b (N,)."""
        w, b = w.astype(np.float64), b.astype(np.float64)
        err = (_quad(w, self.sxx) + 2 * b * (w @ self.sx) + self.n * b * b
               - 2 * np.einsum("nk,kn->n", w, self.sxy) - 2 * b * self.sy + self.syy)
        signal = self.syy - self.sy ** 2 / self.n
        return float(max(err.sum(), 0.0) / max(signal.sum(), 1e-30))

    def centred(self):
        """(mean_x (K,), H (K,K), G (K,N), mean_y (N,)) with H, G of centred data."""
        mx, G, my = self.centred_cross()
        H = np.outer(mx, mx)  # one (K, K) array: H = sxx - n mx mx^T, built in place
        H *= -self.n
        H += self.sxx
        return mx, H, G, my

    def centred_h(self, dtype=FIT_DTYPE) -> np.ndarray:
        """H = sxx - n mx mx^T, centred in float64 (no cancellation when the mean is large) and stored in
        `dtype`, a block of rows at a time: no second (K, K) float64 array."""
        mx = self.sx / self.n
        K = len(mx)
        H = np.empty((K, K), dtype)
        for i in range(0, K, _BLOCK):
            H[i:i + _BLOCK] = self.sxx[i:i + _BLOCK] - self.n * np.outer(mx[i:i + _BLOCK], mx)
        return H

    def centred_cross(self):
        """(mean_x, G, mean_y) without the (K, K) moment."""
        mx, my = self.sx / self.n, self.sy / self.n
        return mx, self.sxy - self.n * np.outer(mx, my), my


RIDGE_STEPS = (1, 10, 100, 1000)  # damps tried where the data cannot pin a layer down: damp times these
UNDERDETERMINED = 4  # ... that is, where a layer has fewer than this many rows a weight of a filter


def held_out_damp(fit_at, fit: LayerStats, held: LayerStats, damp: float) -> float:
    """The ridge of one layer's output-aware fit: `damp` where the fit's rows pin the layer down (at least
    UNDERDETERMINED rows a weight of a filter), else the damp * RIDGE_STEPS whose fit, made on `fit` by
    fit_at(damp) -> (W_hat (N, K), b_hat (N,)), reproduces the original outputs of the held-out rows best.
    With fewer rows than weights a small ridge lets the fit interpolate the calibration rows, errors of
    earlier layers and noise alike: the compressed model then matches its calibration images and little
    else (EfficientNet-Lite0's FC on 64 images: 100 % top-1 agreement on them, 11 % on other crops)."""
    K = fit.sxx.shape[0]
    if held.n == 0 or fit.n == 0 or fit.n >= UNDERDETERMINED * K:
        return damp
    errors = [held.relative_error(*fit_at(damp * step)) for step in RIDGE_STEPS]
    return damp * RIDGE_STEPS[int(np.argmin(errors))]


@dataclass
class OutputMetric:
    """The output metric of one layer at one slice depth: H (padded to s*D features, damped), the
    least-squares weight W* = H^-1 G, and the upper Cholesky factor U of H^-1 with the per-slice
    inverse blocks Linv_j = U_jj^-1. Shared by every (m, k) tried at that depth.

    With `prior` (the layer's original weight, (N, Cg, kh, kw)) the ridge pulls W* toward it rather than
    toward zero, W* = (H + lam I)^-1 (G + lam W), as core.intq does: W* = argmin ||Xc w - Yc||^2 + lam ||w - W||^2.
    Where the calibration rows leave directions of the input space unseen (fewer rows than weights a
    filter, near-duplicate images), W* then keeps the original weight there instead of zeroing it, and
    the model still answers inputs that differ from the calibration set; where the rows pin the layer
    down and its inputs are the original ones, W* is W itself (no shrinkage bias from the damping)."""

    d: int
    kernel: tuple[int, int]
    H: np.ndarray       # (Kp, Kp) damped
    Wstar: np.ndarray   # (N, Kp)
    U: np.ndarray       # (Kp, Kp)
    Linv: np.ndarray    # (s, D, D)
    damping: float = 0.0  # what was added to H's diagonal (H - damping I: the moments of the data)

    @classmethod
    def build(cls, stats: "LayerStats", n_out: int, channels: int, d: int, kernel: tuple[int, int],
              damp: float = 0.01, prior: np.ndarray | None = None) -> "OutputMetric":
        kh, kw = kernel
        s, D = ceil_div(channels, d), d * kh * kw
        K, Kp = channels * kh * kw, s * D
        H = stats.centred_h(FIT_DTYPE)
        _, G, _ = stats.centred_cross()
        lam = damp * max(float(np.mean(np.diag(H))), 1e-12)
        if Kp == K:  # H is a fresh array: damp it in place (the (K, K) arrays dominate the memory of a fit)
            Hp, Gp = H, G.astype(FIT_DTYPE)
        else:
            Hp, Gp = np.zeros((Kp, Kp), FIT_DTYPE), np.zeros((Kp, n_out), FIT_DTYPE)
            Hp[:K, :K], Gp[:K] = H, G
        del H
        Hp[np.diag_indices(Kp)] += lam
        before = float(Hp[0, 0])
        Hp, U = _safe_inverse(Hp)
        lam += float(Hp[0, 0]) - before  # any extra damping _safe_inverse needed
        if prior is not None:  # the ridge's pull: toward the original weight (padded slices stay zero)
            Gp[:K] += lam * prior.reshape(n_out, K).T.astype(FIT_DTYPE)
        Wstar = apply_inverse(U, Gp).T
        blocks = U.reshape(s, D, s, D)[np.arange(s), :, np.arange(s)]  # (s, D, D) diagonal blocks
        return cls(d, kernel, Hp, Wstar, U, _safe_block_inverse(blocks), lam)


def fit_output_aware(weight: np.ndarray, stats: LayerStats, d: int, m: int, *, terms: int = 1, rounds: int = 3,
                     damp: float = 0.01, iterations: int = 20, seed: int = 0, correct: bool = True,
                     metric: OutputMetric | None = None) -> tuple[BinaryFit, np.ndarray]:
    """Per-slice-scale fit of weight (N, Cg, kh, kw) under the output metric; returns (fit, new bias (N,))."""
    N, cg, kh, kw = weight.shape
    s, D = ceil_div(cg, d), d * kh * kw
    K, Kp = cg * kh * kw, s * D
    metric = metric or OutputMetric.build(stats, N, cg, d, (kh, kw), damp, prior=weight)
    mx, G, my = stats.centred_cross()
    Wstar = metric.Wstar
    init = fit_binary_codebook(to_slices(Wstar.reshape(N, s * d, kh, kw).astype(np.float32), d), m,
                               iterations=iterations, seed=seed, terms=terms)
    B = init.codebook.astype(FIT_DTYPE)  # (m, D)
    best = None
    for _ in range(max(rounds, 1)):
        idx, alpha, targets = _sequential_pass(metric, B, terms)
        What = decode(B, idx, alpha).reshape(N, Kp)
        err = float(_quad(What - Wstar, metric.H).sum())
        if best is None or err < best[0]:
            best = (err, B.copy(), idx, alpha)
        B = _update_codebook(B, idx, alpha, targets, metric.Linv @ metric.Linv.transpose(0, 2, 1))
    _, B, idx, alpha = best
    if correct:
        # per-channel least-squares gain: min_g || g Xc w_i - Yc_i ||^2, folded into the scales
        What = decode(B, idx, alpha).reshape(N, Kp)
        num = np.einsum("nk,kn->n", What[:, :K], G)
        den = _quad(What, metric.H) - metric.damping * np.sum(What * What, axis=1)  # undamped: the data's
        gain = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        alpha = alpha * gain[:, None, None]
    alpha = _to_float16_range(alpha)
    What = decode(B, idx, alpha).reshape(N, Kp)[:, :K]
    bias = my - What @ mx  # exact for the centred objective
    fit = BinaryFit(codebook=B.astype(np.int8), indices=idx.astype(np.int64), scales=alpha.astype(np.float32))
    return fit, bias.astype(np.float32)


def fit_output_aware_filter(weight: np.ndarray, stats: LayerStats, d: int, m: int, *, terms: int = 1,
                            damp: float = 0.01, iterations: int = 20, seed: int = 0) -> tuple[BinaryFit, np.ndarray]:
    """Per-filter-scale fit of weight (N, Cg, kh, kw) on calibration statistics; returns (fit, new bias (N,)).

    The binary codebook is fitted (with per-filter scales) to W* = H^-1 G, the weight that best
    reproduces the original outputs from the current inputs; then each filter's one scale gets the
    least-squares gain against the original outputs, and the bias matches their mean."""
    N, cg, kh, kw = weight.shape
    s, D = ceil_div(cg, d), d * kh * kw
    K, Kp = cg * kh * kw, s * D
    metric = OutputMetric.build(stats, N, cg, d, (kh, kw), damp, prior=weight)
    mx, H, G, my = stats.centred()
    fit = fit_binary_codebook(to_slices(metric.Wstar.reshape(N, s * d, kh, kw).astype(np.float32), d), m,
                              scale="filter", iterations=iterations, seed=seed, terms=terms)
    What = fit.decode().astype(np.float64).reshape(N, Kp)[:, :K]
    num = np.einsum("nk,kn->n", What, G)
    den = _quad(What, H)
    gain = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    scales = _to_float16_range(fit.scales * gain[:, None, None].astype(np.float32))
    fit = BinaryFit(codebook=fit.codebook, indices=fit.indices, scales=scales)
    What = fit.decode().astype(np.float64).reshape(N, Kp)[:, :K]
    return fit, (my - What @ mx).astype(np.float32)


def _safe_inverse(H: np.ndarray, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(H', U) with U upper triangular and H'^-1 = U^T U, for H' = H plus the least extra damping that makes
    the factorisation succeed (H as given when it is well conditioned): a singular or indefinite H (too few
    or duplicated calibration rows, dead inputs) is never an error.

    One Cholesky factorisation and one triangular inverse (2/3 K^3 flops): with J the reversal, J H J = L L^T
    gives H = R R^T for the upper R = J L J, so U = R^-1 = J L^-1 J. H^-1 itself is never formed: apply it as
    U^T (U x) (`apply_inverse`)."""
    from scipy.linalg import lapack

    trtri = lapack.strtri if H.dtype == np.float32 else lapack.dtrtri
    potrf = lapack.spotrf if H.dtype == np.float32 else lapack.dpotrf
    scale = max(float(np.mean(np.abs(np.diag(H)))), 1e-12)
    extra = 0.0
    for _ in range(tries):
        Hd = H if extra == 0 else H + np.asarray(extra * scale, H.dtype) * np.eye(len(H), dtype=H.dtype)
        L = np.ascontiguousarray(Hd[::-1, ::-1])  # J H J, factored in place: its Fortran view gets the upper
        Lt, info = potrf(L.T, lower=0, overwrite_a=1, clean=1)  # R = L^T with J H J = L L^T (no second copy)
        if info == 0:
            Linv_t, info = trtri(Lt, lower=0, overwrite_c=1)  # (L^-1)^T, in the same memory
            if info == 0 and np.isfinite(Linv_t).all():
                U = np.ascontiguousarray(Linv_t.T[::-1, ::-1])
                return Hd, U
        del L, Lt
        extra = 1e-6 if extra == 0 else extra * 10
    # last resort: the eigen-decomposition, eigenvalues floored (always succeeds for a finite H)
    w, V = np.linalg.eigh((H + H.T).astype(np.float64) / 2)
    w = np.maximum(w, 1e-3 * scale)
    Hd = (V * w) @ V.T
    Hinv = (V / w) @ V.T
    return Hd.astype(H.dtype), np.linalg.cholesky((Hinv + Hinv.T) / 2).T.astype(H.dtype)


def apply_inverse(U: np.ndarray, X: np.ndarray) -> np.ndarray:
    """H^-1 X for the factor U of `_safe_inverse` (H^-1 = U^T U)."""
    return U.T @ (U @ X)


def _safe_block_inverse(blocks: np.ndarray) -> np.ndarray:
    """Inverses of the (s, D, D) triangular blocks; a singular one gets its pseudo-inverse."""
    try:
        return np.linalg.inv(blocks)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(blocks)


def solve_small(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of (n, k, k) systems; where one is singular, the least-squares (pseudo-inverse) answer."""
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(gram) @ rhs


def _quad(w, S):
    """Row-wise quadratic forms w_i^T S w_i for w (N, K), S (K, K), through BLAS."""
    return np.sum((w @ S) * w, axis=1)


def _sequential_pass(metric: OutputMetric, B, terms):
    """GPTQ-style pass over slice positions.

    Returns indices (N, s, k), scales (N, s, k) and targets (N, s, D): the error-compensated values
    each slice was fitted to. Slice j's error e costs ||e Linv_j||^2 given the later features."""
    Wc = metric.Wstar.copy()
    N = Wc.shape[0]
    s, D, _ = metric.Linv.shape
    U = metric.U
    B = B.astype(Wc.dtype, copy=False)
    idx = np.zeros((N, s, terms), np.int64)
    alpha = np.zeros((N, s, terms), Wc.dtype)
    targets = np.zeros((N, s, D), Wc.dtype)
    rows = np.arange(N)
    for j in range(s):  # sequential by construction; vectorised over filters and codewords
        jb = slice(j * D, (j + 1) * D)
        Linv = metric.Linv[j]
        Y = Wc[:, jb] @ Linv  # (N, D)
        Z = B @ Linv  # (m, D)
        zz = np.maximum((Z * Z).sum(1), 1e-30)
        R = Y.copy()
        for q in range(terms):  # greedy on the residual
            corr = R @ Z.T  # (N, m)
            t = np.argmax(corr * corr / zz, axis=1)
            idx[:, j, q], alpha[:, j, q] = t, corr[rows, t] / zz[t]
            R -= alpha[:, j, q:q + 1] * Z[t]
        if terms > 1:  # joint least-squares scales of the k terms
            Zq = Z[idx[:, j]]  # (N, k, D)
            gram = np.einsum("nqd,nrd->nqr", Zq, Zq) + 1e-9 * np.eye(terms)
            alpha[:, j] = solve_small(gram, np.einsum("nqd,nd->nq", Zq, Y)[..., None])[..., 0]
        alpha[:, j] = np.clip(alpha[:, j], -F16_MAX, F16_MAX).astype(np.float16)  # as stored
        targets[:, j] = Wc[:, jb]
        E = Wc[:, jb] - np.einsum("nq,nqd->nd", alpha[:, j], B[idx[:, j]])
        Wc[:, (j + 1) * D:] -= E @ Linv @ U[jb, (j + 1) * D:]
    return idx, alpha, targets


def _rows_by_index(index: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """(m, D): the sum of the rows whose index is t, for each t < m (sorted segments, no (m, n) one-hot)."""
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index, minlength=m)
    present = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts[present])[:-1]))
    out = np.zeros((m, rows.shape[1]))
    if len(present):
        out[present] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def _update_codebook(B, idx, alpha, targets, metrics, sweeps=3):
    """Each codeword minimises sum over its uses of (a B - T)^T M_j (a B - T) over B in {-1,+1}^D, with T
    the slice's target minus its other terms: the quadratic B^T Q B - 2 r^T B, Q = sum a^2 M_j,
    r = sum a M_j T, by coordinate descent from the current codeword. Unused codewords are kept."""
    m, D = B.shape
    N, s, k = idx.shape
    uses = N * s * k
    flat = idx.ravel()
    slice_of = np.broadcast_to(np.arange(s)[None, :, None], idx.shape).ravel()
    w2 = np.bincount(flat * s + slice_of, weights=(alpha ** 2).ravel(), minlength=m * s).reshape(m, s)
    Q = (w2 @ metrics.reshape(s, D * D)).reshape(m, D, D)
    terms_now = alpha[..., None] * B[idx]  # (N, s, k, D)
    own = targets[:, :, None, :] - terms_now.sum(2, keepdims=True) + terms_now  # (N, s, k, D)
    mt = np.matmul(own.transpose(1, 0, 2, 3), metrics.transpose(0, 2, 1)[:, None])  # (s, N, k, D): M_j T
    mt = mt.transpose(1, 0, 2, 3) * alpha[..., None]  # a M_j T
    r = _rows_by_index(flat, mt.reshape(uses, D), m)  # (m, D)
    B = B.copy()
    diag = np.einsum("mdd->md", Q)
    for _ in range(sweeps):
        changed = False
        for c in range(D):  # coordinate c of every codeword at once
            field = r[:, c] - (np.einsum("md,md->m", Q[:, c, :], B) - diag[:, c] * B[:, c])
            new = np.where(field > 0, 1.0, np.where(field < 0, -1.0, B[:, c]))
            changed |= bool(np.any(new != B[:, c]))
            B[:, c] = new
        if not changed:
            break
    return B
