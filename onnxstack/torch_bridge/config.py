"""FinetuneConfig: how to fine-tune, validated on construction (a frozen dataclass, stored in the output's metadata)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from . import dist

TRAIN_SETS = ("all", "compressed")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune.

    epochs, batch_size (global, split over ranks), lr (AdamW), latent_lr (latent codebooks; None: lr;
    kept low because every bit flip moves all the slices that share the codeword),
    weight_decay, warmup (fraction of steps); temperature T of the distillation softmax;
    labels_weight (cross-entropy weight, needs labels), feature_weight (layer-output matching);
    train: "all" parameters or only the "compressed" layers'; latent_init: mean |latent| at the start,
    spread by the original weights' support for each bit when latent_from_weights (else uniform);
    reassign_every: re-pick indices against the original weights every k epochs (0: never);
    augment_shift (pixels), augment_flip: augmentation of 4-D (N, C, H, W) float inputs;
    val_fraction / max_val: held-out share of `data` when no separate validation set is given;
    max_minutes: wall-time limit of training (evaluation included); checkpoint_minutes: interval of
    mid-epoch checkpoints; device: "cpu", "cuda", "cuda:K" or "auto"; threads: torch CPU threads.
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3
    latent_lr: float | None = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.02
    temperature: float = 2.0
    labels_weight: float = 0.0
    feature_weight: float = 0.0
    train: str = "all"
    latent_init: float = 0.1
    latent_from_weights: bool = True
    reassign_every: int = 0
    augment_shift: int = 0
    augment_flip: bool = False
    val_fraction: float = 0.1
    max_val: int = 5000
    max_minutes: float | None = None
    checkpoint_minutes: float = 2.0
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.epochs, "epochs")
        _positive_int(self.batch_size, "batch_size")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.latent_lr is not None and not self.latent_lr > 0:
            raise ConfigError(f"latent_lr must be > 0, got {self.latent_lr!r}")
        for name in ("weight_decay", "labels_weight", "feature_weight", "augment_shift", "reassign_every"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        _positive_int(self.max_val, "max_val")
        if self.train not in TRAIN_SETS:
            raise ConfigError(f"train must be one of {TRAIN_SETS}, got {self.train!r}")
        if not self.latent_init > 0:
            raise ConfigError(f"latent_init must be > 0, got {self.latent_init!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes!r}")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        dist.check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_int(v, name: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
