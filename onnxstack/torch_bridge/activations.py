"""Running part of an ONNX graph (as an OnnxModule) on cached values, batch by batch.

A `Frontier` holds, for a fixed partition of the calibration images into batches, the values that
are live at one point of the node order (produced so far and read later). `values(names)` runs the
nodes up to the producers of `names` and returns them; the frontier only moves forward, so the
compressed model's frontier runs each block with the weights it has after that block's
reconstruction, and errors of earlier blocks reach the later blocks' inputs. Per-batch storage keeps
values without a batch axis (shape tensors) correct.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .. import op as sbc
from ..errors import OnnxstackError
from .graph import OnnxModule


def graph_constants(module: OnnxModule) -> dict[str, torch.Tensor]:
    """Initializer / Constant name -> the module's live tensor (parameters keep their gradients)."""
    values = {name: module.params[key] for name, key in module.param_names.items()}
    values.update({name: getattr(module, attr) for name, attr in module._buffers_by_name.items()})
    return values


def run_nodes(module: OnnxModule, positions: Iterable[int], values: dict[str, torch.Tensor],
              constants: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Run the module's nodes at `positions` (graph order) on `values`; returns values plus their outputs."""
    env = dict(constants if constants is not None else graph_constants(module))
    env.update(values)
    for pos in positions:
        node = module.nodes[pos]
        if node.op_type == "Constant":
            continue
        if node.op_type == sbc.OP_TYPE:
            results = (module.layers[module.layer_names[node.outputs[0]]](env[node.inputs[0]]),)
        else:
            results = module._run(node, [env[n] if n else None for n in node.inputs])
        for name, value in zip(node.outputs, results):
            if name:
                env[name] = value
    return env


class Frontier:
    """The live values of `module` at one node position, for each batch of the inputs."""

    def __init__(self, module: OnnxModule, batches: Sequence[dict[str, torch.Tensor]], device: torch.device):
        self.module, self.device = module, device
        self.inputs = [dict(b) for b in batches]
        self.produced = {o: p for p, n in enumerate(module.nodes) for o in n.outputs if o}
        self.last_use: dict[str, int] = {}
        for pos, node in enumerate(module.nodes):
            for name in node.inputs:
                self.last_use[name] = pos
        for name in module.output_names:
            self.last_use[name] = len(module.nodes)
        self._reset()

    def _reset(self) -> None:
        self.pos = -1
        self.batches = [dict(b) for b in self.inputs]

    def has(self, name: str) -> bool:
        return name in self.produced or name in self.module.input_names

    @torch.no_grad()
    def values(self, names: Sequence[str]) -> list[list[torch.Tensor]]:
        """For each name, its per-batch values (CPU tensors), running the nodes up to its producer."""
        target = max((self.produced.get(n, -1) for n in names), default=-1)
        if target < self.pos and not all(n in self.batches[0] for n in names):
            self._reset()  # an earlier value that is no longer kept: start again from the inputs
        if target > self.pos:
            self._advance(target, set(names))
        missing = [n for n in names if n not in self.batches[0]]
        if missing:
            raise OnnxstackError(f"internal error: values {missing} are not available at node {self.pos}")
        return [[b[n] for b in self.batches] for n in names]

    def _advance(self, target: int, wanted: set[str]) -> None:
        positions = range(self.pos + 1, target + 1)
        constants = graph_constants(self.module)
        for i, batch in enumerate(self.batches):
            env = run_nodes(self.module, positions, {k: v.to(self.device) for k, v in batch.items()}, constants)
            self.batches[i] = {k: v.cpu() for k, v in env.items()
                               if k not in constants and (k in wanted or self.last_use.get(k, -1) > target)}
        self.pos = target
