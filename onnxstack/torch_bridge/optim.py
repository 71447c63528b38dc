"""The optimiser and learning-rate schedule of a fine-tuning run.

Two AdamW groups: the latent codebooks (lr = latent_lr, no weight decay: every bit flip moves all the
slices that share the codeword) and every other trained parameter (lr, weight_decay). The rate is

    lr(p) = base * (p + 1e-3) / (warmup + 1e-3)                              p < warmup
    lr(p) = base * (1 + cos(pi (p - warmup) / (1 - warmup))) / 2             otherwise

for progress p in [0, 1] (linear warm-up, then cosine decay to 0).
"""

from __future__ import annotations

import math

import torch

from .config import FinetuneConfig
from .graph import OnnxModule


def make_optimizer(student: OnnxModule, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the parameters that do not train get requires_grad=False."""
    return torch.optim.AdamW(param_groups(student, config), lr=config.lr, weight_decay=0.0)


def param_groups(student: OnnxModule, config: FinetuneConfig) -> list[dict]:
    """[latent codebooks, other trained parameters] (config.train: "all" or only the "compressed" layers')."""
    c = config
    latent = [l.latent for l in student.layers.values()]
    ids = {id(p) for p in latent}
    wanted = student.parameters() if c.train == "all" else student.layers.parameters()
    others = [p for p in dict.fromkeys(wanted) if id(p) not in ids]
    trained = ids | {id(p) for p in others}
    for p in student.parameters():
        p.requires_grad_(id(p) in trained)
    return [{"params": list(dict.fromkeys(latent)), "lr": c.latent_lr or c.lr, "weight_decay": 0.0},
            {"params": others, "lr": c.lr, "weight_decay": c.weight_decay}]


def lr_factor(progress: float, warmup: float) -> float:
    """The schedule's multiplier of the base rates at `progress` (clipped to 1)."""
    progress = min(progress, 1.0)
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def set_lr(optimizer: torch.optim.Optimizer, config: FinetuneConfig, progress: float) -> None:
    factor = lr_factor(progress, config.warmup)
    for group, base in zip(optimizer.param_groups, (config.latent_lr or config.lr, config.lr)):
        group["lr"] = base * factor
