"""One process or many: device choice and the few collectives the fine-tuning loop needs.

Under torchrun (RANK / WORLD_SIZE in the environment) the process group is created here, gloo on
CPU and nccl on GPUs; each rank takes an equal share of every global batch (np.array_split), so a
run on N processes sees the same samples per step as a run on one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device or ""):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:K' or 'auto', got {device!r}")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: str, threads: int | None) -> Context:
    """The process's rank and device; joins the process group under torchrun."""
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    rank, world, local = world_from_env()
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__})")
    if cuda:
        index = int(device.split(":")[1]) if ":" in device else (local if world > 1 else 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return Context(rank, world, dev, owns)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and td.is_initialized():
        td.destroy_process_group()


def wrap(module: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """DistributedDataParallel around `module` when there are several ranks (buffers never change)."""
    if ctx.world == 1:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def shard(idx: np.ndarray, ctx: Context) -> np.ndarray:
    """This rank's share of a batch of sample indices."""
    return idx if ctx.world == 1 else np.array_split(idx, ctx.world)[ctx.rank]


def gather_shards(local: torch.Tensor, n: int, ctx: Context) -> torch.Tensor:
    """Concatenate every rank's `shard` of n samples, in rank order (CPU tensor on every rank)."""
    if ctx.world == 1:
        return local
    sizes = [len(p) for p in np.array_split(np.arange(n), ctx.world)]
    width = max(sizes)
    pad = torch.zeros((width - len(local), *local.shape[1:]), dtype=local.dtype)
    mine = torch.cat([local, pad]).to(ctx.device)
    parts = [torch.empty_like(mine) for _ in range(ctx.world)]
    td.all_gather(parts, mine)
    return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes)])


def any_flag(flag: bool, ctx: Context) -> bool:
    """True on every rank when any rank says True."""
    if ctx.world == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device=ctx.device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())
