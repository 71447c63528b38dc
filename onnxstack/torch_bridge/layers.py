"""The trainable StackedBinaryConv: a real-valued latent codebook learned through sign().

    B       = sign(latent)                          (M', d, kh, kw), +-1; sign(0) = -1 as packed
    W_hat   = sum_q scales[:, :, q] B[indices[:, :, q]]   (N, s, d, kh, kw) -> (N, s*d, kh, kw)[:, :channels]  (decode_weight)
    Y       = Conv(X, W_hat, bias)                  ONNX Conv attributes of the node

indices (N, s) / scales (N, s|1) hold one codeword a slice (the paper's form); (N, s, k) / (N, s|1, k)
stack k terms. Internally both are kept as rank 3 and written back in the stored rank.

Gradients reach `latent` through a straight-through estimator (d sign(x)/dx := 1 for |x| <= 1,
the hard-tanh STE of BinaryConnect), so a codeword bit flips when its accumulated gradient pushes
the latent value across 0. `indices` are a buffer: fixed by training, changed only by `reassign`.
Scales are float32 parameters rounded to float16 in the forward pass (straight through), so the
module computes what the written-back file computes. The forward pass equals op.stacked_binary_conv.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.bits import pack_codebook, unpack_codebook
from ..core.fit import F16_MAX
from .ops import conv_nd



class SignSTE(torch.autograd.Function):
    """+1 where x > 0, else -1; backward passes the gradient where |x| <= 1."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def round_f16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest float16 (clamped to its range); the gradient passes unchanged."""
    q = t.detach().clamp(-F16_MAX, F16_MAX).to(torch.float16).to(t.dtype)
    return t + (q - t.detach())


def decode_weight(codewords: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor, channels: int) -> torch.Tensor:
    """W_hat = sum_q scales[:, :, q] B[indices[:, :, q]] as a Conv weight: the bridge's one decode.

    codewords B (M', d, kh, kw) +-1; indices (N, s, k) int64; scales (N, s, k) per slice or (N, 1, k)
    per filter. Slice j fills channels [j d, (j + 1) d) of each filter; the padding channels past
    `channels` are dropped: (N, s, D) -> (N, channels, kh, kw), D = d kh kw. Differentiable in
    codewords and scales. Equals core.fit's BinaryFit.decode followed by from_slices (a test checks).
    """
    N, s, k = indices.shape
    M, d = codewords.shape[:2]
    books = codewords.reshape(M, -1)  # (M', D)
    scales = scales.expand(N, s, k).unsqueeze(2)  # (N, s, 1, k)
    w = torch.matmul(scales, books[indices])  # (N, s, 1, D): the scaled sum of the terms
    return w.reshape(N, s * d, *codewords.shape[2:])[:, :channels]


class StackedBinaryConv2d(nn.Module):
    """One compressed Conv with trainable latent codebook, scales and bias.

    codebook: uint8 (M8, d, kh, kw) packed (core.bits); indices: (N, s[, k]) unsigned ints;
    scales: (N, s|1[, k]); bias: (N,) or None; channels: input channels of the weight (C / group);
    latent_init: magnitude of the initial latent values (+-latent_init from the stored bits).
    """

    def __init__(self, codebook: np.ndarray, indices: np.ndarray, scales: np.ndarray, bias: np.ndarray | None = None,
                 *, channels: int, auto_pad: str = "NOTSET", dilations=None, group: int = 1, kernel_shape=None,
                 pads=None, strides=None, latent_init: float = 0.5):
        super().__init__()
        books = unpack_codebook(np.asarray(codebook))  # (M', d, kh, kw) +-1
        if indices.ndim not in (2, 3) or scales.ndim != indices.ndim:
            raise ValueError(f"indices.shape={indices.shape}, scales.shape={scales.shape} must be (N, s[, k]) "
                             "and (N, s|1[, k])")
        self.stored_rank = indices.ndim
        idx = indices.reshape(*indices.shape[:2], -1)  # (N, s, k)
        sc = scales.reshape(*scales.shape[:2], -1)  # (N, s|1, k)
        N, s, k = idx.shape
        d, kh, kw = books.shape[1:]
        if not (s - 1) * d < channels <= s * d:
            raise ValueError(f"channels={channels} does not match s={s} slices of depth d={d}")
        if sc.shape not in ((N, s, k), (N, 1, k)):
            raise ValueError(f"scales.shape={scales.shape} does not fit indices.shape={indices.shape}")
        if kernel_shape is not None and list(kernel_shape) != [kh, kw]:
            raise ValueError(f"kernel_shape={list(kernel_shape)} but codebook kernel is {[kh, kw]}")
        if idx.size and int(idx.max()) >= len(books):
            raise ValueError(f"index {int(idx.max())} out of range for {len(books)} codewords")
        self.latent = nn.Parameter(torch.from_numpy(books * float(latent_init)))
        self.register_buffer("indices", torch.from_numpy(idx.astype(np.int64)))
        self.scales = nn.Parameter(torch.from_numpy(sc.astype(np.float32)))
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(np.asarray(bias, np.float32).copy()))
        self.channels = int(channels)
        self.index_dtype = np.dtype(indices.dtype)
        self.conv = dict(auto_pad=auto_pad, dilations=dilations, group=group, pads=pads, strides=strides)

    @property
    def slice_dim(self) -> int:
        return self.latent.shape[1]

    def codewords(self) -> torch.Tensor:
        """(M', d, kh, kw) +-1, differentiable (STE) in `latent`."""
        return SignSTE.apply(self.latent)

    def weight(self) -> torch.Tensor:
        """The decoded weight (N, channels, kh, kw), with the scales the stored float16 holds."""
        return decode_weight(self.codewords(), self.indices, round_f16(self.scales), self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_nd(x, self.weight(), self.bias, **self.conv)

    def _slices(self, target) -> torch.Tensor:
        """A real-valued weight (N, channels, kh, kw) as zero-padded slices (N, s, D)."""
        if isinstance(target, np.ndarray):
            target = torch.from_numpy(np.array(target, np.float32))
        target = target.to(self.latent.device, torch.float32)
        N, s, _ = self.indices.shape
        padded = torch.zeros((N, s * self.slice_dim, *target.shape[2:]), device=target.device)
        padded[:, : self.channels] = target
        return padded.reshape(N, s, -1)

    def _terms(self) -> torch.Tensor:
        """Each term's scaled codeword scales[i, j, q] B[indices[i, j, q]]: (N, s, k, D), detached, float32
        scales (the residuals init_latent and reassign fit against; the weight itself is decode_weight's)."""
        N, s, k = self.indices.shape
        books = self.codewords().detach().reshape(len(self.latent), -1)
        return self.scales.detach().expand(N, s, k).unsqueeze(-1) * books[self.indices]

    @torch.no_grad()
    def init_latent(self, target, magnitude: float) -> None:
        """Latent magnitudes from a real-valued weight (N, channels, kh, kw), signs kept.

        With r_ijq = w_ij minus the slice's other terms, c_t = sum_{pi(ijq)=t} alpha_ijq r_ijq /
        sum alpha_ijq^2 is codeword t's least-squares real value; |latent| = magnitude * c_t B_t / mean|c_t|,
        kept in [0.01 magnitude, 1] (the STE passes gradients up to 1), so the bits the slices support
        weakly, or contradict, are the first to flip.
        """
        w = self._slices(target)  # (N, s, D)
        terms = self._terms()  # (N, s, k, D)
        resid = w.unsqueeze(2) - terms.sum(2, keepdim=True) + terms  # (N, s, k, D)
        N, s, k = self.indices.shape
        alpha = self.scales.detach().expand(N, s, k).reshape(-1)
        idx = self.indices.reshape(-1)
        M = len(self.latent)
        acc = torch.zeros((M, w.shape[-1]), device=w.device).index_add_(0, idx, alpha[:, None] * resid.reshape(-1, w.shape[-1]))
        norm = torch.zeros(M, device=w.device).index_add_(0, idx, alpha ** 2)
        used = norm > 0
        flat = self.latent.data.reshape(M, -1)  # a view: writes go to latent
        signs = torch.where(flat[used] > 0, 1.0, -1.0)
        c = acc[used] / norm[used, None] * signs  # (used, D), < 0 where the weights disagree with the bit
        mag = (magnitude * c / c.abs().mean().clamp_min(1e-12)).clamp(0.01 * magnitude, 1.0)
        flat[used] = signs * mag

    @torch.no_grad()
    def reassign(self, target) -> int:
        """Re-pick each term's codeword for a real-valued target weight (N, channels, kh, kw).

        Term by term, against r = w minus the slice's other terms: per-slice scales take
        pi = argmax_t |<r, B_t>| and, where the codeword changes, the least-squares scale <r, B_pi> / D
        (unchanged terms keep their learned scale); per-filter scales take pi = argmax_t sign(alpha) <r, B_t>.
        Returns how many indices changed.
        """
        w = self._slices(target)  # (N, s, D)
        N, s, k = self.indices.shape
        books = self.codewords().reshape(len(self.latent), -1)  # (M', D)
        before = self.indices.clone()
        per_slice = self.scales.shape[1] == s
        for q in range(k):
            terms = self._terms()
            r = w - terms.sum(2) + terms[:, :, q]  # (N, s, D)
            corr = r @ books.T  # (N, s, M')
            if per_slice:
                idx = corr.abs().argmax(-1)
                best = corr.gather(-1, idx.unsqueeze(-1))[..., 0] / books.shape[1]
                self.scales.data[:, :, q] = torch.where(idx != self.indices[:, :, q], best, self.scales.data[:, :, q])
            else:
                sign = torch.where(self.scales.data[:, :, q] >= 0, 1.0, -1.0).unsqueeze(-1)  # (N, 1, 1)
                idx = (corr * sign).argmax(-1)
            self.indices[:, :, q] = idx
        return int((self.indices != before).sum())

    def stored_tensors(self) -> dict[str, np.ndarray]:
        """The tensors the ONNX node stores, in their stored dtypes, shapes and ranks, by role."""
        M, d, kh, kw = self.latent.shape
        signs = (self.latent.detach().cpu().numpy() > 0).reshape(M, -1)
        indices = self.indices.cpu().numpy().astype(self.index_dtype)
        scales = self.scales.detach().cpu().numpy().clip(-F16_MAX, F16_MAX).astype(np.float16)
        if self.stored_rank == 2:
            indices, scales = indices[:, :, 0], scales[:, :, 0]
        out = {"codebook": pack_codebook(np.where(signs, 1, -1), (d, kh, kw)), "indices": indices, "scales": scales}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu().numpy().astype(np.float32)
        return out

    def extra_repr(self) -> str:
        N, s, k = self.indices.shape
        return (f"filters={N}, channels={self.channels}, slices={s}, terms={k}, codewords={len(self.latent)}, "
                f"kernel={list(self.latent.shape[2:])}, scales={tuple(self.scales.shape)}")
