"""Stretching a small image calibration set: seeded random views (crop and resize back, shift, flip).

Every view is one bilinear resampling of the image, per axis

    source = scale * output + offset      (pixel centres; scale < 1 zooms into a crop, < 0 mirrors)

with positions beyond the edge taking the edge pixel, computed for a whole batch at once.
"""

from __future__ import annotations

import numpy as np

from .data import LAYOUTS, Dataset, Feeds, _is_int
from .errors import ConfigError, DataError


def augment(data: Dataset, factor: int, seed: int = 0, *, layout: str = "auto", flip: bool = True) -> Dataset:
    """`data` stretched `factor`-fold with random views of its images: samples 0..n-1 are the originals, then
    factor-1 rounds of views of each, labels repeated. A view is a crop (AUGMENT_CROP of each side, or more)
    resized back bilinearly, moved by up to AUGMENT_SHIFT of a side (edges repeated beyond the image), and
    mirrored left-right half of the time (flip=False: never). Views are drawn once from `seed`, so the same
    seed gives the same samples; they are computed batch by batch, as the samples are fetched.

    Images: one float input of rank 4, laid out "nchw" or "nhwc" ("auto": channels-first unless only the last
    dim is 1 or 3)."""
    if not _is_int(factor) or factor < 1:
        raise ConfigError(f"augment factor must be a positive integer, got {factor!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if factor == 1:
        return data
    first = data._fetch(np.arange(1))
    if len(first) != 1 or next(iter(first.values())).ndim != 4 or next(iter(first.values())).dtype.kind != "f":
        shapes = ", ".join(f"'{k}' {v.shape[1:]} {v.dtype}" for k, v in first.items())
        raise DataError(f"{data.source or 'data'}: --augment stretches images (one float input of rank 4); "
                        f"this data has {shapes} per sample")
    (name, sample), = first.items()
    if layout == "auto":
        layout = "nhwc" if sample.shape[1] not in (1, 3) and sample.shape[3] in (1, 3) else "nchw"
    hw = sample.shape[2:4] if layout == "nchw" else sample.shape[1:3]
    n = len(data)
    views = _draw_views(n * (factor - 1), hw, np.random.default_rng(seed), flip)  # (V, 4) per axis: scale, offset

    def fetch(idx: np.ndarray) -> Feeds:
        idx = np.asarray(idx)
        x = data._fetch(idx % n)[name]
        out = x.copy()
        derived = idx >= n
        if derived.any():
            out[derived] = _resample(x[derived], views[idx[derived] - n], layout)
        return {name: out}

    labels = None if data.labels is None else np.tile(data.labels, factor)
    return Dataset([name], n * factor, fetch, labels, data.classes, data.source, original_size=data.original_size)


AUGMENT_CROP = 0.85   # smallest crop side, as a fraction of the image side
AUGMENT_SHIFT = 1 / 16  # largest shift, as a fraction of the image side (at least one pixel)


def _draw_views(count: int, hw: tuple[int, int], rng: np.random.Generator, flip: bool) -> np.ndarray:
    """(count, 4): for rows then columns, the scale and offset of output pixel -> source pixel centres."""
    views = np.empty((count, 4))
    crop = rng.uniform(AUGMENT_CROP, 1.0, size=count)  # one zoom for both axes
    mirror = rng.random(count) < 0.5 if flip else np.zeros(count, bool)
    for axis, size in enumerate(hw):
        side = crop * size
        start = rng.uniform(0, size - side)  # crop origin, in pixels
        reach = max(1, round(AUGMENT_SHIFT * size))
        start = start + rng.integers(-reach, reach + 1, size=count)
        scale = side / size
        offset = start + 0.5 * scale - 0.5  # source centre of output pixel 0
        if axis == 1:
            offset, scale = np.where(mirror, offset + scale * (size - 1), offset), np.where(mirror, -scale, scale)
        views[:, 2 * axis], views[:, 2 * axis + 1] = scale, offset
    return views


def _resample(x: np.ndarray, views: np.ndarray, layout: str) -> np.ndarray:
    """Bilinear resampling of images x (B, C, H, W) or (B, H, W, C) at source = scale * out + offset per
    axis, one view per image; positions beyond the edge take the edge pixel."""
    img = x if layout == "nhwc" else x.transpose(0, 2, 3, 1)  # (B, H, W, C)
    B, H, W, _ = img.shape
    rows = views[:, 0:1] * np.arange(H) + views[:, 1:2]  # (B, H)
    cols = views[:, 2:3] * np.arange(W) + views[:, 3:4]  # (B, W)
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[:, :, None, None], (cols - c0)[:, None, :, None]  # weights of the next pixel
    r = [np.clip(r0 + i, 0, H - 1).astype(np.int64) for i in (0, 1)]
    c = [np.clip(c0 + i, 0, W - 1).astype(np.int64) for i in (0, 1)]
    b = np.arange(B)[:, None, None]
    px = lambda i, j: img[b, r[i][:, :, None], c[j][:, None, :]]  # noqa: E731 - (B, H, W, C)
    out = (px(0, 0) * (1 - fc) + px(0, 1) * fc) * (1 - fr) + (px(1, 0) * (1 - fc) + px(1, 1) * fc) * fr
    out = out.astype(x.dtype)
    return out if layout == "nhwc" else out.transpose(0, 3, 1, 2)
