"""The distillation objective of one batch (teacher = the original model, student = the compressed one):

    L = sum_o T^2 KL(softmax(t_o / T) || softmax(s_o / T))        over each logits output o
      + labels_weight  * CE(s_0, y)                                when labels exist and are asked for
      + feature_weight * mean_l ||s_l - t_l||^2 / mean(t_l^2)      over the compressed layers' outputs

Class scores lie on axis 1; outputs with spatial axes (N, K, H, W) count every position as a sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], n_logits: int, *,
                      temperature: float, labels: torch.Tensor | None = None, labels_weight: float = 0.0,
                      feature_weight: float = 0.0) -> torch.Tensor:
    """L above; the first `n_logits` outputs are logits, the rest compressed layers' outputs."""
    n = n_logits
    loss = sum(kl(s, t, temperature) for s, t in zip(student[:n], teacher[:n]))
    if labels_weight and labels is not None:
        loss = loss + labels_weight * F.cross_entropy(class_last(student[0]), labels.reshape(-1))
    if len(student) > n:
        feat = [F.mse_loss(s, t) / (t.pow(2).mean() + 1e-8) for s, t in zip(student[n:], teacher[n:])]
        loss = loss + feature_weight * sum(feat) / len(feat)
    return loss


def kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)) averaged over samples (class axis 1)."""
    s, t = class_last(s), class_last(t)
    return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T


def class_last(y: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) -> (N * ..., K) rows of class scores."""
    return y.reshape(len(y), -1) if y.dim() <= 2 else y.movedim(1, -1).reshape(-1, y.shape[1])


def class_last_np(y: np.ndarray) -> np.ndarray:
    return class_last(torch.from_numpy(np.asarray(y))).numpy()
