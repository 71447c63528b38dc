"""Bit packing of binary codebooks and index storage types.

Layout (the op's specification): a codebook of m codewords in {-1,+1}^(d, kh, kw) is stored as
uint8 of shape (M8, d, kh, kw) with M8 = ceil(m / 8). Codeword t is bit k = t // M8 (LSB = 0)
of byte row r = t % M8; a set bit is +1. Packing along the codeword axis keeps (d, kh, kw)
visible in the stored shape, so the decoder needs no attributes to reshape it; codewords past m
are padding that no index points to.
"""

from __future__ import annotations

import numpy as np


def packed_rows(m: int) -> int:
    """M8: byte rows needed for m codewords."""
    return -(-m // 8)


def pack_codebook(codebook: np.ndarray, kernel: tuple[int, int, int]) -> np.ndarray:
    """(m, D) array of +-1 -> uint8 (M8, d, kh, kw)."""
    m, D = codebook.shape
    d, kh, kw = kernel
    if D != d * kh * kw:
        raise ValueError(f"codebook.shape={codebook.shape} does not match kernel={kernel}")
    rows = packed_rows(m)
    bits = np.zeros((8 * rows, D), dtype=np.uint8)
    bits[:m] = codebook > 0
    bits = bits.reshape(8, rows, D)  # (bit k, byte row r, D)
    weights = (1 << np.arange(8, dtype=np.uint16)).reshape(8, 1, 1)
    packed = (bits * weights).sum(axis=0).astype(np.uint8)  # (M8, D)
    return packed.reshape(rows, d, kh, kw)


def unpack_codebook(packed: np.ndarray) -> np.ndarray:
    """uint8 (M8, d, kh, kw) -> float32 (8 * M8, d, kh, kw) of +-1 (padding codewords included)."""
    if packed.dtype != np.uint8 or packed.ndim != 4:
        raise ValueError(f"packed codebook must be uint8 of rank 4, got {packed.dtype} {packed.shape}")
    shifts = np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1, 1)
    bits = (packed[None] >> shifts) & 1  # (8, M8, d, kh, kw)
    return (bits.astype(np.float32) * 2 - 1).reshape(-1, *packed.shape[1:])


def index_dtype(m: int) -> np.dtype:
    """Smallest unsigned integer type that holds indices in [0, m)."""
    if m <= 1 << 8:
        return np.dtype(np.uint8)
    if m <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def pack_int4(values: np.ndarray) -> bytes:
    """Integers in [-8, 7] (any shape) -> ONNX INT4 raw bytes: two's-complement nibbles in row-major order,
    element 2i in the low nibble of byte i, 2i+1 in the high one; an odd count leaves the last high nibble 0."""
    flat = values.astype(np.int8).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"int4 values must be in [-8, 7], got [{flat.min()}, {flat.max()}]")
    nib = (flat.astype(np.uint8) & 0x0F)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """ONNX INT4 raw bytes -> int8 array of `count` values (the inverse of pack_int4)."""
    b = np.frombuffer(raw, np.uint8)
    nib = np.stack([b & 0x0F, b >> 4], axis=1).ravel()[:count].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)
