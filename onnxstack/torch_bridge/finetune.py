"""Fine-tuning a compressed model by distillation from the original, and writing the result back.

Objective per batch (teacher = the original model, frozen; student = the compressed model):

    L = T^2 KL(softmax(t / T) || softmax(s / T))                 over each logits output
      + labels_weight  * CE(s, y)                                 when labels exist and are asked for
      + feature_weight * mean_l ||s_l - t_l||^2 / mean(t_l^2)     over the compressed layers' outputs

AdamW with linear warm-up and cosine decay (progress = the larger of steps done / planned and, with
a time limit, time used / allowed). After each epoch the student is scored on held-out data (top-1
accuracy with labels, agreement with the teacher without); the best epoch (epoch 0 = before
training) is kept. A checkpoint is written atomically after each epoch and every few minutes, so an
interrupted run resumes where it stopped. Under torchrun the loop runs with DistributedDataParallel:
every rank takes its share of each global batch and rank 0 writes files.

The learned values go back into the compressed ONNX file by initializer name (`write_back`); the graph
is never re-exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import ConfigError, ModelError, OnnxstackError
from ..io import save_model_atomic
from ..load import load_model
from . import dist
from .graph import OnnxModule, layer_outputs, logit_names
from .samples import Samples, augment, split_heldout
from .writeback import write_back

CHECKPOINT_VERSION = 1
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


@dataclass
class FinetuneResult:
    """The fine-tuned model and what happened: one history record per evaluated epoch."""

    model: onnx.ModelProto
    history: list[dict]
    best_epoch: int
    metric: str  # "accuracy" or "agreement"
    onnx_metrics: dict | None = None  # the written model in onnxruntime on the held-out data
    source: Path | None = None

    @property
    def best(self) -> dict:
        return next(r for r in self.history if r["epoch"] == self.best_epoch)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, external_data: bool | None = None) -> Path:
        """Write atomically (never over the compressed input); external data only when needed (None)."""
        return save_model_atomic(self.model, path, overwrite=overwrite, source=self.source, external_data=external_data)


def finetune(compressed, teacher, data, *, val=None, config: FinetuneConfig | None = None,
             checkpoint: str | os.PathLike | None = None, resume: bool = False,
             callback: Callable[[str, dict], None] | None = None) -> FinetuneResult:
    """Fine-tune `compressed` (path or ModelProto) against `teacher`, the original model.

    data / val: an onnxstack.data.Dataset or (feeds, labels) arrays; without `val`, a held-out share
    of `data` is scored each epoch. checkpoint: file written each epoch (resume=True continues from
    it). callback(event, info) sees "epoch_start", "step", "reassign", "epoch_end" (on rank 0 only).
    """
    config = config or FinetuneConfig()
    student_model, source = load_model(compressed)
    teacher_model, _ = load_model(teacher)
    ctx = dist.setup(config.device, config.threads)
    try:
        run = _Run(student_model, teacher_model, config, ctx, callback)
        train, held = split_heldout(run.input_names, data, val, fraction=config.val_fraction,
                                    max_val=config.max_val, seed=config.seed)
        state = run.restore(checkpoint, resume)
        run.train(train, held, state, checkpoint)
        result = run.result(held, source)
    finally:
        dist.teardown(ctx)
    return result


# --- the run -----------------------------------------------------------------------------------------


class _Run:
    """Holds the models, optimizer and schedule of one fine-tuning run."""

    def __init__(self, student_model, teacher_model, config: FinetuneConfig, ctx: "dist.Context", callback):
        self.config, self.ctx, self.callback = config, ctx, callback
        self.student_model = student_model
        self.student = OnnxModule(student_model, latent_init=config.latent_init).to(ctx.device)
        self.teacher = OnnxModule(teacher_model).to(ctx.device).eval().requires_grad_(False)
        if not self.student.layers:
            raise ModelError("the compressed model has no StackedBinaryConv layer to fine-tune; run compress first")
        self.input_names = self.student.input_names
        if sorted(self.teacher.input_names) != sorted(self.input_names):
            raise ModelError(f"teacher inputs {self.teacher.input_names} differ from the compressed model's "
                             f"{self.input_names}; is --teacher the original model?")
        self.logits = logit_names(student_model)
        teacher_values = {o for n in teacher_model.graph.node for o in n.output} | set(self.teacher.input_names)
        missing = [n for n in self.logits if n not in teacher_values]
        if missing:
            raise ModelError(f"the teacher has no tensor named {missing}; is --teacher the original model?")
        self.features = [n for n in layer_outputs(student_model) if n in teacher_values] if config.feature_weight else []
        self.targets = _original_weights(student_model, teacher_model)
        if config.latent_from_weights:
            self._init_latents()
        self.optimizer = torch.optim.AdamW(self._groups(), lr=config.lr, weight_decay=0.0)
        self.model = dist.wrap(self.student, ctx)  # after _groups: DDP syncs the parameters that train
        self.fingerprint = hashlib.sha256(student_model.SerializeToString()).hexdigest()[:16]
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "score", "state"}

    def _groups(self) -> list[dict]:
        c = self.config
        latent = [l.latent for l in self.student.layers.values()]
        ids = {id(p) for p in latent}
        wanted = self.student.parameters() if c.train == "all" else self.student.layers.parameters()
        others = [p for p in dict.fromkeys(wanted) if id(p) not in ids]
        trained = ids | {id(p) for p in others}
        for p in self.student.parameters():
            p.requires_grad_(id(p) in trained)
        return [{"params": list(dict.fromkeys(latent)), "lr": c.latent_lr or c.lr, "weight_decay": 0.0},
                {"params": others, "lr": c.lr, "weight_decay": c.weight_decay}]

    # --- checkpoints ---

    def restore(self, path, resume: bool) -> dict:
        """Training position {epoch, step, global_step, elapsed}; loads the checkpoint when resuming."""
        state = {"epoch": 0, "step": 0, "global_step": 0, "elapsed": 0.0}
        if not resume:
            return state
        if path is None or not Path(path).is_file():
            raise OnnxstackError(f"--resume: no checkpoint at {path}")
        try:
            ckpt = torch.load(path, map_location=self.ctx.device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged file
            raise OnnxstackError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
        if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("fingerprint") != self.fingerprint:
            raise OnnxstackError(f"{path}: checkpoint of another compressed model or onnxstack version; "
                                 "delete it or drop --resume")
        self.student.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.history, self.best = ckpt["history"], ckpt["best"]
        return ckpt["position"]

    def save(self, path, position: dict) -> None:
        if path is None or not self.ctx.is_main:
            return
        ckpt = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "config": self.config.to_dict(),
                "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "best": self.best, "position": dict(position)}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    # --- training ---

    def train(self, train: Samples, held: Samples, pos: dict, checkpoint) -> None:
        c = self.config
        steps = max(1, len(train) // c.batch_size)
        total = steps * c.epochs
        start = time.monotonic() - pos["elapsed"]  # the time limit counts the teacher's passes too
        held_t = self._teacher_outputs(held)
        cached = self._teacher_outputs(train) if not (c.augment_shift or c.augment_flip or self.features) else None
        if not self.history:
            self._evaluate(0, held, held_t)
            self.save(checkpoint, pos)
        limit = c.max_minutes * 60 if c.max_minutes else None
        last_save = time.monotonic()
        while pos["epoch"] < c.epochs:
            if limit and pos["step"] == 0 and dist.any_flag(time.monotonic() - start >= limit, self.ctx):
                break  # the time is up: no new epoch (the schedule has already decayed to 0)
            epoch = pos["epoch"] + 1
            self._emit("epoch_start", {"epoch": epoch, "epochs": c.epochs, "steps": steps})
            order = np.random.default_rng([c.seed, epoch]).permutation(len(train))
            self.model.train()
            stopped = False
            for step in range(pos["step"], steps):
                idx = order[step * c.batch_size:(step + 1) * c.batch_size]
                elapsed = time.monotonic() - start
                progress = max(pos["global_step"] / total, elapsed / limit if limit else 0.0)
                self._set_lr(progress)
                loss, agree = self._step(train, idx, cached, [c.seed, epoch, step])
                pos.update(step=step + 1, global_step=pos["global_step"] + 1, elapsed=time.monotonic() - start)
                self._emit("step", {"epoch": epoch, "step": step + 1, "steps": steps, "loss": loss, "agreement": agree})
                if limit and dist.any_flag(pos["elapsed"] >= limit, self.ctx):
                    stopped = True
                    break
                if c.checkpoint_minutes and time.monotonic() - last_save > c.checkpoint_minutes * 60:
                    self.save(checkpoint, pos)
                    last_save = time.monotonic()
            if c.reassign_every and epoch % c.reassign_every == 0 and epoch < c.epochs and not stopped:
                self._reassign()
            self._evaluate(epoch, held, held_t, partial=stopped)
            pos.update(epoch=c.epochs if stopped else epoch, step=0, elapsed=time.monotonic() - start)
            self.history[-1]["minutes"] = round(pos["elapsed"] / 60, 3)
            self.save(checkpoint, pos)
            last_save = time.monotonic()
            self._emit("epoch_end", dict(self.history[-1]))
            if stopped:
                break

    def _set_lr(self, progress: float) -> None:
        c = self.config
        progress = min(progress, 1.0)
        if progress < c.warmup:
            factor = (progress + 1e-3) / (c.warmup + 1e-3)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (progress - c.warmup) / (1 - c.warmup)))
        for group, base in zip(self.optimizer.param_groups, (c.latent_lr or c.lr, c.lr)):
            group["lr"] = base * factor

    def _step(self, train: Samples, idx: np.ndarray, cached, seed) -> tuple[float, float]:
        c = self.config
        part = dist.shard(idx, self.ctx)
        feeds = {k: torch.from_numpy(v[part]).to(self.ctx.device) for k, v in train.feeds.items()}
        if c.augment_shift or c.augment_flip:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            feeds = augment(feeds, c.augment_shift, c.augment_flip, gen)
        names = self.logits + self.features
        if cached is None:
            with torch.no_grad():
                t_out = self.teacher(**feeds, outputs=names)
        else:
            t_out = tuple(torch.from_numpy(t[part]).to(self.ctx.device) for t in cached)
        s_out = self.model(**feeds, outputs=names)
        n = len(self.logits)
        loss = sum(_kl(s, t, c.temperature) for s, t in zip(s_out[:n], t_out[:n]))
        if c.labels_weight and train.labels is not None:
            labels = torch.from_numpy(train.labels[part]).to(self.ctx.device)
            loss = loss + c.labels_weight * F.cross_entropy(_class_last(s_out[0]), labels.reshape(-1))
        if self.features:
            feat = [F.mse_loss(s, t) / (t.pow(2).mean() + 1e-8) for s, t in zip(s_out[n:], t_out[n:])]
            loss = loss + c.feature_weight * sum(feat) / len(feat)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        agree = (_class_last(s_out[0]).argmax(1) == _class_last(t_out[0]).argmax(1)).float().mean()
        return float(loss.detach()), float(agree)

    @torch.no_grad()
    def _teacher_outputs(self, data: Samples, batch: int = 512) -> list[np.ndarray]:
        """The teacher's logits outputs on all of `data` (each rank computes a share, then all-gather)."""
        idx = dist.shard(np.arange(len(data)), self.ctx)
        parts = []
        for i in range(0, len(idx), batch):
            feeds = {k: torch.from_numpy(v[idx[i:i + batch]]).to(self.ctx.device) for k, v in data.feeds.items()}
            parts.append([t.cpu() for t in self.teacher(**feeds, outputs=self.logits)])
        local = [torch.cat([p[j] for p in parts]) for j in range(len(self.logits))]
        return [dist.gather_shards(t, len(data), self.ctx).numpy() for t in local]

    @torch.no_grad()
    def _evaluate(self, epoch: int, held: Samples, teacher_logits: list[np.ndarray], partial: bool = False) -> None:
        self.student.eval()
        logits = _class_last_np(self._predict(held))
        t_logits = _class_last_np(teacher_logits[0])
        record = {"epoch": epoch, "agreement": float(np.mean(logits.argmax(1) == t_logits.argmax(1))),
                  "kl": float(_kl(torch.from_numpy(logits), torch.from_numpy(t_logits), 1.0)),
                  "samples": len(held)}
        if held.labels is not None:
            record["accuracy"] = float(np.mean(logits.argmax(1) == held.labels.reshape(-1)))
            record["teacher_accuracy"] = float(np.mean(t_logits.argmax(1) == held.labels.reshape(-1)))
        if partial:
            record["partial"] = True
        self.history.append(record)
        score = (record.get("accuracy", record["agreement"]), -record["kl"])
        if self.best is None or score > tuple(self.best["score"]):
            state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
            self.best = {"epoch": epoch, "score": list(score), "state": state}
        self.student.train()

    def _predict(self, data: Samples, batch: int = 512) -> np.ndarray:
        idx = dist.shard(np.arange(len(data)), self.ctx)
        outs = []
        for i in range(0, len(idx), batch):
            feeds = {k: torch.from_numpy(v[idx[i:i + batch]]).to(self.ctx.device) for k, v in data.feeds.items()}
            outs.append(self.student(**feeds, outputs=self.logits[:1])[0].cpu())
        local = torch.cat(outs) if outs else torch.zeros(0)
        return dist.gather_shards(local, len(data), self.ctx).numpy()

    def _init_latents(self) -> None:
        for key, layer in self.student.layers.items():
            target = self.targets.get(self.student.layer_tensors[key]["codebook"])
            if target is not None:
                layer.init_latent(target, self.config.latent_init)

    @torch.no_grad()
    def _reassign(self) -> None:
        changed = 0
        for key, layer in self.student.layers.items():
            target = self.targets.get(self.student.layer_tensors[key]["codebook"])
            if target is not None:
                changed += layer.reassign(target)
        self._emit("reassign", {"changed": changed})

    def _emit(self, event: str, info: dict) -> None:
        if self.callback and self.ctx.is_main:
            self.callback(event, info)

    # --- result ---

    def result(self, held: Samples, source) -> FinetuneResult:
        self.student.load_state_dict(self.best["state"])
        metric = "accuracy" if held.labels is not None else "agreement"
        meta = {"onnxstack.version": __version__, "best_epoch": self.best["epoch"], "metric": metric,
                "config": self.config.to_dict(), "history": self.history}
        model = write_back(self.student_model, self.student, meta)
        result = FinetuneResult(model, self.history, self.best["epoch"], metric, source=source)
        if self.ctx.is_main:
            result.onnx_metrics = _onnx_metrics(model, held)
        return result


# --- helpers ---------------------------------------------------------------------------------------


def _kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)) averaged over samples (class axis 1)."""
    s, t = _class_last(s), _class_last(t)
    return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T


def _class_last(y: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) -> (N * ..., K) rows of class scores."""
    return y.reshape(len(y), -1) if y.dim() <= 2 else y.movedim(1, -1).reshape(-1, y.shape[1])


def _class_last_np(y: np.ndarray) -> np.ndarray:
    return _class_last(torch.from_numpy(np.asarray(y))).numpy()


def _original_weights(student_model: onnx.ModelProto, teacher_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Codebook initializer name -> the original Conv weight (matched by node output name)."""
    inits = {t.name: t for t in teacher_model.graph.initializer}
    convs = {n.output[0]: n for n in teacher_model.graph.node if n.op_type == "Conv"}
    out = {}
    for node in student_model.graph.node:
        conv = convs.get(node.output[0]) if node.op_type == "StackedBinaryConv" else None
        if conv is not None and len(conv.input) > 1 and conv.input[1] in inits:
            out[node.input[1]] = onnx.numpy_helper.to_array(inits[conv.input[1]])
    return out


def _onnx_metrics(model: onnx.ModelProto, held: Samples) -> dict:
    """Top-1 accuracy / agreement of the written model in onnxruntime on the held-out data."""
    from ..api import open_session

    session = open_session(model)
    names = [o.name for o in session.get_outputs()]
    logits = np.concatenate([session.run(None, {k: v[i:i + 512] for k, v in held.feeds.items()})[0]
                             for i in range(0, len(held), 512)])
    out = {"output": names[0], "samples": len(held)}
    if held.labels is not None:
        out["accuracy"] = float(np.mean(_class_last_np(logits).argmax(1) == held.labels.reshape(-1)))
    return out


def _positive_int(v, name: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
