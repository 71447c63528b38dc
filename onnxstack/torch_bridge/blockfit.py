"""The trainable tensors of one reconstruction block, its loss, the optimisation loop and its held-out guard
(reconstruct.py runs one BlockFit a block)."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .activations import graph_constants, run_nodes
from .graph import OnnxModule
from .layers import StackedBinaryConv2d

CACHE_BATCH = 128


class BlockFit:
    """The trainable tensors of one block, its loss, and the optimisation loop."""

    def __init__(self, module: OnnxModule, block: Block, weights: dict, config,
                 device: torch.device, target: torch.Tensor):
        self.module, self.block, self.config, self.device, self.target = module, block, config, device, target
        keys = dict.fromkeys(module.layer_names[module.nodes[p].outputs[0]] for p in block.nodes
                             if module.nodes[p].op_type == "StackedBinaryConv")
        self.layers: list[StackedBinaryConv2d] = [module.layers[k] for k in keys]
        self.originals = [weights.get(module.layer_tensors[k]["codebook"]) for k in keys]
        self.outputs = [module.nodes[p].outputs[0] for p in block.nodes if module.nodes[p].op_type == "StackedBinaryConv"]
        self.weight = None
        if config.loss == "channel" and target.dim() >= 2:
            dims = [0, *range(2, target.dim())]
            var = target.var(dims)
            self.weight = (1.0 / (var + 1e-6 * var.mean() + 1e-12)).reshape(1, -1, *([1] * (target.dim() - 2)))
            self.weight = (self.weight / self.weight.mean()).to(device)
        self.t_norm = float(target.pow(2).mean()) + 1e-12
        self.constants = graph_constants(module)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        env = run_nodes(self.module, self.block.nodes, dict(zip(self.block.inputs, xs)), self.constants)
        return env[self.block.output]

    def loss(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = (y - t).pow(2)
        return (d * self.weight).mean() if self.weight is not None else d.mean() / self.t_norm

    @torch.no_grad()
    def error(self, xs: list[torch.Tensor], target: torch.Tensor | None = None, batch: int = CACHE_BATCH) -> float:
        """||f(x_c) - t||^2 / ||t||^2 over the cached images (the training target unless one is given)."""
        target = self.target if target is None else target
        self.constants = graph_constants(self.module)
        num = den = 0.0
        for i in range(0, len(target), batch):
            t = target[i:i + batch].to(self.device)
            y = self.forward([x[i:i + batch].to(self.device) for x in xs])
            num += float((y - t).pow(2).sum())
            den += float(t.pow(2).sum())
        return num / max(den, 1e-30)

    def snapshot(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in self.layers]

    def restore(self, snapshot) -> None:
        for layer, state in zip(self.layers, snapshot):
            layer.load_state_dict(state)

    def done(self) -> None:
        for layer in self.layers:
            layer.requires_grad_(False)

    def _groups(self, xs) -> list[dict]:
        c = self.config
        with torch.no_grad():  # each layer's output rms sets its bias step
            self.constants = graph_constants(self.module)
            env = run_nodes(self.module, self.block.nodes,
                            dict(zip(self.block.inputs, [x[:CACHE_BATCH].to(self.device) for x in xs])), self.constants)
        groups = []
        for layer, original, out in zip(self.layers, self.originals, self.outputs):
            if c.train_latent:
                if original is not None:
                    layer.init_latent(original, c.latent_init)
                else:
                    layer.latent.data.mul_(c.latent_init / layer.latent.detach().abs().mean().clamp_min(1e-12))
                groups.append({"params": [layer.latent], "lr": c.latent_lr})
            if c.train_scales:
                groups.append({"params": [layer.scales], "lr": c.lr * float(layer.scales.detach().abs().mean())})
            if c.train_bias and layer.bias is not None:
                groups.append({"params": [layer.bias], "lr": c.lr * float(env[out].pow(2).mean().sqrt()) + 1e-12})
        for g in groups:
            g["base_lr"] = g["lr"]
            for p in g["params"]:
                p.requires_grad_(True)
        return groups

    @torch.no_grad()
    def too_few_rows(self, xs: list[torch.Tensor]) -> str | None:
        """Why the block's training data cannot pin its layers down (None when they can): a layer whose
        training rows (images x output positions) are fewer than min_rows x its input features."""
        c = self.config
        if not c.min_rows:
            return None
        self.constants = graph_constants(self.module)
        env = run_nodes(self.module, self.block.nodes, dict(zip(self.block.inputs, [x[:1].to(self.device) for x in xs])),
                        self.constants)
        n = len(self.target)
        for layer, out in zip(self.layers, self.outputs):
            features = layer.channels * int(np.prod(layer.latent.shape[2:]))
            rows = n * int(np.prod(env[out].shape[2:]))
            if rows < c.min_rows * features:
                return (f"{rows} training rows (images x output positions) for {features} input features of "
                        f"'{out}': too few to train (min_rows={c.min_rows:g}); closed-form values kept")
        return None

    def train(self, xs, xo, rng: np.random.Generator, budget: float | None, t0: float,
              held: Callable[[], float] | None = None) -> tuple[int, int, dict]:
        """Runs the optimisation and leaves the block at its best values: with `held` (the held-out error
        of the current model), those of the lowest held-out error among the checks every check_every
        steps (step 0, the values it started from, included), else the trained values if their training
        loss is lower than at the start. Returns (steps done, indices changed by kept re-assignments, losses)."""
        c = self.config
        before = self.error(xs)
        start = self.snapshot()
        best = held() if held else before
        losses = {"before": before}
        if held:
            losses["held_out_before"] = best
        best_state, best_step, since = start, 0, 0
        groups = self._groups(xs)
        opt = torch.optim.Adam(groups)
        gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
        n = len(self.target)
        bs = min(c.batch_size, n)
        reassigned, step = 0, 0
        self.constants = graph_constants(self.module)
        for step in range(1, c.steps + 1):
            elapsed = time.monotonic() - t0
            if budget is not None and elapsed >= budget:
                step -= 1
                break
            progress = max((step - 1) / c.steps, elapsed / budget if budget else 0.0)
            for g in groups:
                g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            idx = torch.from_numpy(rng.choice(n, bs, replace=False))
            x = [v[idx] for v in xs]
            if xo is not None:
                x = [torch.where(torch.rand(v.shape, generator=gen) < c.qdrop, o[idx], v) for v, o in zip(x, xo)]
            loss = self.loss(self.forward([v.to(self.device) for v in x]), self.target[idx].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if c.reassign_every and step % c.reassign_every == 0 and step < c.steps:
                reassigned += self._reassign(xs)
            if held and (step % c.check_every == 0 or step == c.steps):
                err = held()
                self.constants = graph_constants(self.module)
                if err < best:
                    best, best_state, best_step, since = err, self.snapshot(), step, 0
                else:
                    since += 1
                    if c.patience and since >= c.patience:
                        break
        trained = self.error(xs)
        losses["trained"] = trained
        if held:
            if step % c.check_every and step != c.steps and step > best_step:  # stopped between checks
                err = held()
                if err < best:
                    best, best_state, best_step = err, self.snapshot(), step
            self.restore(best_state)
            losses.update(held_out_after=best, best_step=best_step, kept=best_step > 0,
                          after=self.error(xs) if best_step > 0 else before)
        else:
            kept = trained < before
            if not kept:
                self.restore(start)
            losses.update(kept=kept, after=trained if kept else before)
        return step, reassigned, losses

    def _reassign(self, xs, images: int = 256) -> int:
        """Indices re-picked against the original weights; kept only when the loss on `images` drops."""
        sub = [x[:images] for x in xs]
        target, self.target = self.target, self.target[:images]
        try:
            before, snap = self.error(sub), self.snapshot()
            changed = sum(l.reassign(w) for l, w in zip(self.layers, self.originals) if w is not None)
            if changed and self.error(sub) >= before:
                self.restore(snap)
                changed = 0
        finally:
            self.target = target
            self.constants = graph_constants(self.module)
        return changed


