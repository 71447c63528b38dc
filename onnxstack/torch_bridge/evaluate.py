"""Held-out scoring of a fine-tuning run, and keeping the best epoch.

Each evaluated epoch gives one record: agreement (share of samples whose top-1 class matches the
teacher's), kl (the distillation KL at T = 1), samples, and with labels accuracy and teacher_accuracy.
An epoch ranks by (accuracy, or agreement without labels; then -kl); the best one's state is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import torch

from . import dist
from .loss import class_last_np, kl
from .samples import Samples


@torch.no_grad()
def predict(module: torch.nn.Module, data: Samples, names: Sequence[str], ctx: "dist.Context",
            batch: int = 512) -> list[np.ndarray]:
    """The module's outputs `names` on all of `data` (each rank computes a share, then all-gather)."""
    idx = dist.shard(np.arange(len(data)), ctx)
    parts = []
    for i in range(0, len(idx), batch):
        feeds = {k: torch.from_numpy(v[idx[i:i + batch]]).to(ctx.device) for k, v in data.feeds.items()}
        parts.append([t.cpu() for t in module(**feeds, outputs=names)])
    local = [torch.cat([p[j] for p in parts]) if parts else torch.zeros(0) for j in range(len(names))]
    return [dist.gather_shards(t, len(data), ctx).numpy() for t in local]


def heldout_record(epoch: int, logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray | None,
                   partial: bool = False) -> dict:
    """The record of one epoch from the student's and the teacher's first logits output (samples first)."""
    samples = len(logits)
    logits, t_logits = class_last_np(logits), class_last_np(teacher_logits)
    record = {"epoch": epoch, "agreement": float(np.mean(logits.argmax(1) == t_logits.argmax(1))),
              "kl": float(kl(torch.from_numpy(logits), torch.from_numpy(t_logits), 1.0)),
              "samples": samples}
    if labels is not None:
        record["accuracy"] = float(np.mean(logits.argmax(1) == labels.reshape(-1)))
        record["teacher_accuracy"] = float(np.mean(t_logits.argmax(1) == labels.reshape(-1)))
    if partial:
        record["partial"] = True
    return record


@dataclass
class Scoreboard:
    """The history of records and the best epoch so far: {"epoch", "score", "state"} (CPU state_dict)."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None

    def add(self, record: dict, module: torch.nn.Module) -> None:
        self.history.append(record)
        score = (record.get("accuracy", record["agreement"]), -record["kl"])
        if self.best is None or score > tuple(self.best["score"]):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            self.best = {"epoch": record["epoch"], "score": list(score), "state": state}


def onnx_metrics(model: onnx.ModelProto, held: Samples) -> dict:
    """Top-1 accuracy / agreement of the written model in onnxruntime on the held-out data."""
    from ..runtime import open_session

    session = open_session(model)
    names = [o.name for o in session.get_outputs()]
    logits = np.concatenate([session.run(None, {k: v[i:i + 512] for k, v in held.feeds.items()})[0]
                             for i in range(0, len(held), 512)])
    out = {"output": names[0], "samples": len(held)}
    if held.labels is not None:
        out["accuracy"] = float(np.mean(class_last_np(logits).argmax(1) == held.labels.reshape(-1)))
    return out
