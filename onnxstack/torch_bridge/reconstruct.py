"""Block reconstruction: after the closed-form calibrated fit, fit each block of the compressed model
to reproduce the original block's output on calibration data (BRECQ-style, post-training).

For each block b (see blocks.py), in graph order:

    x_c = the block input computed by the compressed model (earlier blocks already reconstructed)
    x_o = the same value in the original model;  t = the original value at the block output
    x   = where(u < qdrop, x_o, x_c)  elementwise, u ~ U(0, 1)        (QDrop-style mixing)
    min over the block's latent codebooks, scales, biases of  L(f_b(x), t)
    L   = ||f_b(x) - t||^2 / ||t||^2,  or with loss="channel" the per-channel MSE over var_c(t), averaged

Codebooks train through sign() with a straight-through estimator (layers.py); every
`reassign_every` steps the indices may be re-picked against the original weights, kept only when
the block loss drops. Adam with cosine decay; the learning rates of scales and biases are relative
to their layer's magnitude, so one setting fits any model. An eighth of the images is held out:
every `check_every` steps the whole compressed model's output error on them is measured and the block
keeps its best values (the closed-form ones count as step 0), so a block stays trained only if the model
gets closer to the original on images it never trained on. The error is the model's, not the block's,
because the closed-form fit of each later layer compensated the earlier layers' errors: a block that
matches its own target better can still move the output away. A block whose training rows (images x
output positions) are fewer than its layers' input features (an FC layer lifted to a 1x1 conv has one
row an image) is not trained. Values go back into the compressed file by initializer name.

    model, report = reconstruct(original, compressed, {"input": x}, ReconstructConfig(steps=500))
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import ConfigError, DataError, ModelError
from ..load import load_model
from .activations import Frontier, run_nodes
from .blockfit import BlockFit as _BlockFit
from .blocks import Block, find_blocks
from .dist import check_device
from .graph import OnnxModule
from .writeback import original_weights, set_metadata, write_back

METADATA_KEY = "onnxstack.reconstruct"
LOSSES = ("mse", "channel")
CACHE_BATCH = 128  # images a batch when computing the cached activations


@dataclass(frozen=True)
class ReconstructConfig:
    """How to reconstruct.

    steps: optimisation steps per block; batch_size: images per step;
    lr: Adam step of scales and biases, relative to the layer's mean |scale| and output rms;
    latent_lr: Adam step of the latent codebooks (bits flip when a latent value crosses 0);
    latent_init: mean |latent| at the start (spread by the original weights' support for each bit);
    train_latent / train_scales / train_bias: which tensors learn (latent only by default: on the
    sample models, also training scales and biases lowered the block loss further but cost top-1);
    reassign_every: re-pick indices against the original weights every k steps (0: never), kept
    when the block loss drops; qdrop: probability that an input element comes from the original
    model instead of the compressed one; loss: "mse" (relative) or "channel" (per-channel normalised);
    max_images: calibration images used; memory_mb: cap of the cached activations (fewer images
    when they would not fit); max_block_layers: larger cut-free regions fall back to one layer a block;
    group: merge consecutive blocks until each holds at least this many compressed convs;
    max_minutes: wall-time limit of the whole run (shared out over the blocks left; None: no limit);
    held_out: fraction of the images (seeded; at least 8, and only with 16 or more) kept out of training:
    every `check_every` steps each block's loss on them is measured and the best weights so far kept
    (the closed-form weights count as step 0), so a block keeps its trained values only if they are
    closer to the original on images it never trained on; training stops after `patience` checks
    without a new best (0: never). held_out=0 trains on every image and judges a block by its training
    loss (the old behaviour);
    min_rows: a block is not trained when its training rows (images x output positions) are fewer
    than min_rows x the input features (c_in kh kw / group) of its widest layer: the data then leave
    directions of the input space unseen (an FC layer lifted to a 1x1 conv has one row an image);
    0: train every block;
    device: "cpu", "cuda", "cuda:K" or "auto"; threads: torch CPU threads (None: torch's default);
    seed: minibatches and mixing masks.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-2
    latent_lr: float = 1e-3
    latent_init: float = 0.05
    train_latent: bool = True
    train_scales: bool = False
    train_bias: bool = False
    reassign_every: int = 0
    qdrop: float = 0.0
    loss: str = "mse"
    max_images: int = 1024
    memory_mb: int = 2048
    max_block_layers: int = 8
    group: int = 1
    max_minutes: float | None = None
    held_out: float = 0.125
    check_every: int = 50
    patience: int = 4
    min_rows: float = 1.0
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_images", "memory_mb", "max_block_layers", "group", "check_every"):
            _positive_int(getattr(self, name), name)
        for name in ("lr", "latent_lr", "latent_init"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.reassign_every, int) or isinstance(self.reassign_every, bool) or self.reassign_every < 0:
            raise ConfigError(f"reassign_every must be an integer >= 0, got {self.reassign_every!r}")
        if not isinstance(self.qdrop, (int, float)) or not 0 <= self.qdrop <= 1:
            raise ConfigError(f"qdrop must be a probability in [0, 1], got {self.qdrop!r}")
        if not isinstance(self.held_out, (int, float)) or isinstance(self.held_out, bool) or not 0 <= self.held_out < 1:
            raise ConfigError(f"held_out must be a fraction in [0, 1), got {self.held_out!r}")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 0:
            raise ConfigError(f"patience must be an integer >= 0, got {self.patience!r}")
        if (not isinstance(self.min_rows, (int, float)) or isinstance(self.min_rows, bool) or not self.min_rows >= 0
                or not math.isfinite(self.min_rows)):
            raise ConfigError(f"min_rows must be a finite number >= 0, got {self.min_rows!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("train_latent", "train_scales", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.train_latent or self.train_scales or self.train_bias):
            raise ConfigError("nothing to train: train_latent, train_scales and train_bias are all False")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise ConfigError(f"max_minutes must be > 0 or None, got {self.max_minutes!r}")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ReconstructConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown reconstruct option(s) {unknown}")
        return cls(**values)


def reconstruct(original, compressed, feeds, config: ReconstructConfig | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Reconstruct every block of `compressed` (what onnxstack.compress wrote from `original`; paths or
    ModelProtos) on calibration `feeds` (input name -> array, sample axis 0; other keys such as
    `labels` are ignored; one array for a single-input model).

    Returns the compressed model with the learned values (same nodes, initializer names, dtypes and
    shapes) and a JSON-ready report. progress(done, total, block name) is called after each block."""
    config = config or ReconstructConfig()
    original_model, _ = load_model(original)
    compressed_model, _ = load_model(compressed)
    device = _device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _Run(original_model, compressed_model, config, device).run(feeds, progress)
    finally:
        torch.set_num_threads(threads)


# --- the run -------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, original_model: onnx.ModelProto, compressed_model: onnx.ModelProto,
                 config: ReconstructConfig, device: torch.device):
        self.config, self.device = config, device
        self.compressed_model = compressed_model
        self.student = OnnxModule(compressed_model).to(device).requires_grad_(False)
        self.teacher = OnnxModule(original_model).to(device).eval().requires_grad_(False)
        if not self.student.layers:
            raise ModelError("the compressed model has no StackedBinaryConv layer to reconstruct; run compress first")
        if sorted(self.teacher.input_names) != sorted(self.student.input_names):
            raise ModelError(f"original inputs {self.teacher.input_names} differ from the compressed model's "
                             f"{self.student.input_names}; is it the model that was compressed?")
        self.blocks = find_blocks(compressed_model, max_layers=config.max_block_layers,
                                  group=config.group)
        self.weights = original_weights(compressed_model, original_model)

    def run(self, feeds, progress) -> tuple[onnx.ModelProto, dict]:
        c = self.config
        start = time.monotonic()
        x = _feeds(feeds, self.student.input_names)
        n_all = len(next(iter(x.values())))
        per_image = self._bytes_per_image(x)
        n = max(1, min(n_all, c.max_images, int(c.memory_mb * 2**20 // max(per_image, 1))))
        rng = np.random.default_rng(c.seed)
        pick = np.sort(rng.choice(n_all, n, replace=False)) if n < n_all else np.arange(n)
        n_held = max(int(round(n * c.held_out)), 8) if c.held_out > 0 and n >= 16 else 0
        order = np.random.default_rng([c.seed, 1]).permutation(n)
        held, train = np.sort(pick[order[:n_held]]), np.sort(pick[order[n_held:]])
        fronts = self._fronts(x, train)
        checks = self._fronts(x, held) if n_held else None
        self.held_batches = [{k: torch.from_numpy(np.ascontiguousarray(v[held[i:i + CACHE_BATCH]])) for k, v in x.items()}
                             for i in range(0, n_held, CACHE_BATCH)]
        self.held_ref = [self._outputs(self.teacher, b) for b in self.held_batches]
        records, skipped = [], []
        for b, block in enumerate(self.blocks):
            reason = self._unusable(block, fronts["original"])
            if reason:
                skipped.append({"block": block.name, "layers": list(block.layers), "reason": reason})
            else:
                left = None if c.max_minutes is None else c.max_minutes * 60 - (time.monotonic() - start)
                budget = None if left is None else max(left, 0.0) / (len(self.blocks) - b)
                record = self._block(b, block, fronts, checks, budget)
                (skipped if "reason" in record else records).append(record)
            if progress:
                progress(b + 1, len(self.blocks), block.name)
        seconds = time.monotonic() - start
        totals = {"blocks": len(records), "blocks_skipped": len(skipped), "images": len(train), "images_held_out": n_held,
                  "images_given": n_all, "steps": sum(r["steps"] for r in records), "seconds": round(seconds, 2),
                  "kept": sum(r["kept"] for r in records), "bytes_per_image": per_image, "device": str(self.device)}
        report = {"onnxstack.version": __version__, "config": c.to_dict(), "blocks": records, "skipped": skipped,
                  "totals": totals}
        model = write_back(self.compressed_model, self.student)
        set_metadata(model, {METADATA_KEY: json.dumps({"config": c.to_dict(), "totals": totals}, sort_keys=True)})
        return model, report

    @torch.no_grad()
    def _outputs(self, module: OnnxModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env = run_nodes(module, range(len(module.nodes)), {k: v.to(self.device) for k, v in batch.items()})
        return [env[n] for n in module.output_names]

    def output_error(self) -> float:
        """The compressed model's relative squared output error on the held-out images (as
        pipeline._output_error: per float output, sum (y - t)^2 / sum (t - mean t)^2, summed)."""
        num: dict[int, float] = {}
        den: dict[int, float] = {}
        ref_all = [torch.cat([r[j] for r in self.held_ref]) for j in range(len(self.held_ref[0]))]
        got = [self._outputs(self.student, b) for b in self.held_batches]
        total = 0.0
        for j, ref in enumerate(ref_all):
            if not ref.is_floating_point():
                continue
            y = torch.cat([g[j] for g in got]).to(ref.device)
            total += float((y - ref).pow(2).sum()) / max(float((ref - ref.mean()).pow(2).sum()), 1e-30)
        return total

    def _fronts(self, x: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Frontier]:
        batches = [{k: torch.from_numpy(np.ascontiguousarray(v[rows[i:i + CACHE_BATCH]])) for k, v in x.items()}
                   for i in range(0, len(rows), CACHE_BATCH)]
        return {"compressed": Frontier(self.student, batches, self.device),
                "original": Frontier(self.teacher, batches, self.device)}

    def _unusable(self, block: Block, original: Frontier) -> str | None:
        missing = [v for v in (*block.inputs, block.output) if not original.has(v)]
        if missing:
            return f"the original model has no value named {missing}"
        return None

    # --- one block ---

    def _block(self, b: int, block: Block, fronts: dict[str, Frontier], checks: dict[str, Frontier] | None,
               budget: float | None) -> dict:
        c = self.config
        t0 = time.monotonic()
        xs, target = self._data(block, fronts)
        xo = [torch.cat(v) for v in fronts["original"].values(block.inputs)] if c.qdrop > 0 else None
        fit = _BlockFit(self.student, block, self.weights, c, self.device, target)
        short = fit.too_few_rows(xs)
        if short:
            return {"block": block.name, "layers": list(block.layers), "reason": short}
        val = self._data(block, checks) if checks else None
        before_val = fit.error(*val) if val else None
        steps, reassigned, losses = fit.train(xs, xo, np.random.default_rng([c.seed, b]), budget, t0,
                                              self.output_error if val else None)
        kept = losses["kept"]
        fit.done()
        record = {"block": block.name, "kind": block.kind, "layers": list(block.layers), "nodes": len(block.nodes),
                  "output": block.output, "images": len(target), "steps": steps, "reassigned": reassigned,
                  "loss_before": losses["before"], "loss_after": losses["after"], "loss_trained": losses["trained"],
                  "kept": kept, "seconds": round(time.monotonic() - t0, 2)}
        if val:
            record.update({"held_out_images": len(val[1]), "held_out_loss_before": before_val,
                           "held_out_loss_after": fit.error(*val) if kept else before_val,
                           "held_out_output_error_before": losses["held_out_before"],
                           "held_out_output_error_after": losses["held_out_after"], "best_step": losses["best_step"]})
        return record

    def _data(self, block: Block, fronts: dict[str, Frontier]) -> tuple[list[torch.Tensor], torch.Tensor]:
        xs = [torch.cat(v) for v in fronts["compressed"].values(block.inputs)]
        (target,) = [torch.cat(v) for v in fronts["original"].values([block.output])]
        for name, v in zip(block.inputs, xs):
            if not v.is_floating_point() or len(v) != len(target):
                raise ModelError(f"block {block.name}: input '{name}' (shape {tuple(v.shape)}) is not a batch of "
                                 "float activations; cannot reconstruct")
        return xs, target

    def _bytes_per_image(self, x: dict[str, np.ndarray]) -> int:
        """Cached bytes per image at the worst point: both models' live values and one block's data."""
        one = {k: torch.from_numpy(np.ascontiguousarray(v[:1])).to(self.device) for k, v in x.items()}
        with torch.no_grad():
            env = run_nodes(self.teacher, range(len(self.teacher.nodes)), one)
        size = {k: v.numel() * 4 for k, v in env.items() if isinstance(v, torch.Tensor) and v.dim() and len(v) == 1}
        front = Frontier(self.teacher, [], self.device)
        live, worst = {k for k in one}, 0
        for pos, node in enumerate(self.teacher.nodes):
            live = {v for v in live | set(node.outputs) if front.last_use.get(v, -1) > pos}
            worst = max(worst, sum(size.get(v, 0) for v in live))
        block = max((sum(size.get(v, 0) for v in (*bl.inputs, bl.output)) for bl in self.blocks), default=0)
        return 2 * worst + 2 * block


# --- helpers -------------------------------------------------------------------------------------------


def _feeds(feeds, input_names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(feeds, np.ndarray):
        if len(input_names) != 1:
            raise DataError(f"calibration data: one array given, the model has inputs {input_names}")
        feeds = {input_names[0]: feeds}
    if not isinstance(feeds, dict):
        raise DataError(f"calibration data: expected a dict of arrays keyed by input name, got {type(feeds).__name__}")
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise DataError(f"calibration data: no data for model input(s) {missing}; got {sorted(feeds)}")
    out = {n: np.asarray(feeds[n]) for n in input_names}
    counts = {len(v) for v in out.values()}
    if len(counts) != 1 or 0 in counts:
        raise DataError(f"calibration data: inputs must hold the same number (> 0) of samples, got {sorted(counts)}")
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: torch sees no CUDA device (torch {torch.__version__})")
    return torch.device(name)


def _positive_int(v, name: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
