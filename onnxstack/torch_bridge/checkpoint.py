"""Checkpoints of a fine-tuning run: written atomically, refused when they belong to another model.

A checkpoint holds the student's state, the optimiser's state, the history and best epoch so far and
the training position {epoch, step, global_step, elapsed}; resuming from it continues the run exactly.
It is tied to one compressed model by `fingerprint` (a hash of the serialised ModelProto) and to
this format by CHECKPOINT_VERSION.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import torch

from ..errors import OnnxstackError, one_line

CHECKPOINT_VERSION = 1


def fingerprint(model: onnx.ModelProto) -> str:
    """16 hex digits identifying the compressed model a checkpoint belongs to."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, *, fingerprint: str, config: dict, student: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, history: list[dict], best: dict | None, position: dict) -> None:
    """Write the checkpoint to a temporary file beside `path`, then rename it over `path`."""
    ckpt = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "config": config,
            "student": student.state_dict(), "optimizer": optimizer.state_dict(),
            "history": history, "best": best, "position": dict(position)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike | None, *, device: torch.device, fingerprint: str) -> dict:
    """The checkpoint at `path` (keys as save_checkpoint writes them); OnnxstackError when it is missing,
    unreadable, or of another compressed model or format version."""
    if path is None or not Path(path).is_file():
        raise OnnxstackError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file
        raise OnnxstackError(f"{path}: not a readable checkpoint ({one_line(e, 200)})") from None
    if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != fingerprint:
        raise OnnxstackError(f"{path}: checkpoint of another compressed model or onnxstack version; "
                             "delete it or drop --resume")
    return ckpt
