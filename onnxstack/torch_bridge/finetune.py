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

Modules: config (FinetuneConfig), loss (the objective), optim (AdamW groups and the schedule),
evaluate (held-out scoring, the best epoch), checkpoint (save / resume); this one holds the loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import ModelError
from ..io import save_model_atomic
from ..load import load_model
from . import dist
from .checkpoint import CHECKPOINT_VERSION, fingerprint, load_checkpoint, save_checkpoint  # noqa: F401
from .config import TRAIN_SETS, FinetuneConfig  # noqa: F401 - importable from here as before
from .evaluate import Scoreboard, heldout_record, onnx_metrics, predict
from .graph import OnnxModule, layer_outputs, logit_names
from .loss import class_last, distillation_loss
from .optim import make_optimizer, set_lr
from .samples import Samples, augment, split_heldout
from .writeback import original_weights, write_back


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
    """The models of one fine-tuning run and its loop; the parts live in optim, evaluate and checkpoint."""

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
        self.targets = original_weights(student_model, teacher_model)
        if config.latent_from_weights:
            self._init_latents()
        self.optimizer = make_optimizer(self.student, config)
        self.model = dist.wrap(self.student, ctx)  # after make_optimizer: DDP syncs the parameters that train
        self.fingerprint = fingerprint(student_model)
        self.board = Scoreboard()

    # --- checkpoints ---

    def restore(self, path, resume: bool) -> dict:
        """Training position {epoch, step, global_step, elapsed}; loads the checkpoint when resuming."""
        state = {"epoch": 0, "step": 0, "global_step": 0, "elapsed": 0.0}
        if not resume:
            return state
        ckpt = load_checkpoint(path, device=self.ctx.device, fingerprint=self.fingerprint)
        self.student.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.board = Scoreboard(ckpt["history"], ckpt["best"])
        return ckpt["position"]

    def save(self, path, position: dict) -> None:
        if path is None or not self.ctx.is_main:
            return
        save_checkpoint(path, fingerprint=self.fingerprint, config=self.config.to_dict(), student=self.student,
                        optimizer=self.optimizer, history=self.board.history, best=self.board.best, position=position)

    # --- training ---

    def train(self, train: Samples, held: Samples, pos: dict, checkpoint) -> None:
        c = self.config
        steps = max(1, len(train) // c.batch_size)
        total = steps * c.epochs
        start = time.monotonic() - pos["elapsed"]  # the time limit counts the teacher's passes too
        held_t = predict(self.teacher, held, self.logits, self.ctx)
        cached = predict(self.teacher, train, self.logits, self.ctx) if not (
            c.augment_shift or c.augment_flip or self.features) else None
        if not self.board.history:
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
                set_lr(self.optimizer, c, max(pos["global_step"] / total, elapsed / limit if limit else 0.0))
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
            self.board.history[-1]["minutes"] = round(pos["elapsed"] / 60, 3)
            self.save(checkpoint, pos)
            last_save = time.monotonic()
            self._emit("epoch_end", dict(self.board.history[-1]))
            if stopped:
                break

    def _step(self, train: Samples, idx: np.ndarray, cached, seed) -> tuple[float, float]:
        """One optimiser step on the global batch `idx` (this rank's share); returns (loss, agreement)."""
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
        labels = None
        if c.labels_weight and train.labels is not None:
            labels = torch.from_numpy(train.labels[part]).to(self.ctx.device)
        loss = distillation_loss(s_out, t_out, len(self.logits), temperature=c.temperature, labels=labels,
                                 labels_weight=c.labels_weight, feature_weight=c.feature_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        agree = (class_last(s_out[0]).argmax(1) == class_last(t_out[0]).argmax(1)).float().mean()
        return float(loss.detach()), float(agree)

    @torch.no_grad()
    def _evaluate(self, epoch: int, held: Samples, teacher_logits: list[np.ndarray], partial: bool = False) -> None:
        self.student.eval()
        logits = predict(self.student, held, self.logits[:1], self.ctx)[0]
        self.board.add(heldout_record(epoch, logits, teacher_logits[0], held.labels, partial), self.student)
        self.student.train()

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
        best, history = self.board.best, self.board.history
        self.student.load_state_dict(best["state"])
        metric = "accuracy" if held.labels is not None else "agreement"
        meta = {"onnxstack.version": __version__, "best_epoch": best["epoch"], "metric": metric,
                "config": self.config.to_dict(), "history": history}
        model = write_back(self.student_model, self.student, meta)
        result = FinetuneResult(model, history, best["epoch"], metric, source=source)
        if self.ctx.is_main:
            result.onnx_metrics = onnx_metrics(model, held)
        return result
