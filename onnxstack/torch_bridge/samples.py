"""Training and held-out samples in memory, and the image augmentation of the fine-tuning loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError


@dataclass
class Samples:
    """Model inputs keyed by name (sample axis 0) and optional int64 class labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def take(self, idx: np.ndarray) -> "Samples":
        return Samples({k: v[idx] for k, v in self.feeds.items()}, None if self.labels is None else self.labels[idx])


def as_samples(data, input_names: list[str], what: str) -> Samples:
    """An onnxstack.data.Dataset (read with .arrays()) or (feeds, labels), feeds a dict or, for a
    single-input model, one array."""
    if hasattr(data, "arrays"):
        feeds, labels = data.arrays()
    elif isinstance(data, tuple) and len(data) == 2:
        feeds, labels = data
    else:
        raise DataError(f"{what}: expected an onnxstack Dataset or (feeds, labels), got {type(data).__name__}")
    if isinstance(feeds, np.ndarray):
        if len(input_names) != 1:
            raise DataError(f"{what}: one array given, the model has inputs {input_names}")
        feeds = {input_names[0]: feeds}
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise DataError(f"{what}: no data for model input(s) {missing}; got {sorted(feeds)}")
    feeds = {n: np.asarray(feeds[n]) for n in input_names}
    counts = {len(v) for v in feeds.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1 or 0 in counts:
        raise DataError(f"{what}: inputs and labels must hold the same number (> 0) of samples, got {sorted(counts)}")
    return Samples(feeds, None if labels is None else np.asarray(labels, dtype=np.int64))


def split_heldout(input_names, data, val, *, fraction: float, max_val: int, seed: int) -> tuple[Samples, Samples]:
    """(training, held-out): `val` when given, else a seeded random `fraction` (at most max_val) of `data`."""
    train = as_samples(data, input_names, "training data")
    if val is not None:
        return train, as_samples(val, input_names, "validation data")
    n = len(train)
    n_val = min(max_val, max(1, round(n * fraction)))
    if n - n_val < 1:
        raise DataError(f"training data: {n} sample(s) leave nothing to train on after holding out {n_val}")
    order = np.random.default_rng(seed).permutation(n)
    return train.take(np.sort(order[n_val:])), train.take(np.sort(order[:n_val]))


def augment(feeds: dict, shift: int, flip: bool, gen: torch.Generator) -> dict:
    """Random translation by up to `shift` pixels (zero fill) and horizontal flip of 4-D (N, C, H, W)
    float inputs; other inputs pass unchanged."""
    out = {}
    for name, x in feeds.items():
        if x.dim() != 4 or not x.is_floating_point():
            out[name] = x
            continue
        n, c, h, w = x.shape
        if shift:
            padded = F.pad(x, (shift,) * 4)
            dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
            dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(c, device=x.device)[None, :, None, None], rows, cols]  # (n, c, h, w)
        if flip:
            mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        out[name] = x
    return out
