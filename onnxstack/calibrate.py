"""Data-aware compression: fit each Conv to preserve the original model's outputs.

Layers are processed in graph order. For each one, the calibration images are run through the model
in which the earlier layers are already compressed, so layer l sees the inputs it will see at run time;
its target is the *original* model's output of that layer at the same sampled positions. Only a fixed
number of positions per image is kept (bounded memory). The math is in core/calib.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analyse import ConvInfo
from .config import CompressConfig
from .core.calib import LayerStats, fit_output_aware, im2col_rows, output_size
from .core.conv import resolve_pads
from .core.fit import from_slices, relative_error, to_slices
from .errors import ConfigError
from .plan import LayerPlan, plan_layer

BATCH = 64


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named intermediate tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def _run(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]):
    """Yield, per batch, {name: array} of the named tensors (graph inputs passed through)."""
    from .api import open_session

    wanted = [n for n in names if n not in feeds]
    sess = open_session(with_outputs(model, wanted)) if wanted else None
    n = len(next(iter(feeds.values())))
    for start in range(0, n, BATCH):
        batch = {k: v[start:start + BATCH] for k, v in feeds.items()}
        got = dict(zip(wanted, sess.run(wanted, batch))) if sess else {}
        yield {name: batch[name] if name in batch else got[name] for name in names}


def _geometry(info: ConvInfo, in_hw):
    kh, kw = info.shape[2:]
    strides = list(info.attrs.get("strides", [1, 1]))
    dil = list(info.attrs.get("dilations", [1, 1]))
    pads = resolve_pads(in_hw, (kh, kw), strides, dil, info.attrs.get("pads"), info.attrs.get("auto_pad", "NOTSET"))
    return dict(kernel=(kh, kw), strides=strides, pads=pads, dilations=dil)


@dataclass
class Targets:
    """Per eligible layer: sampled output positions per batch, the original outputs there, and the
    moments of the original inputs against them (for choosing settings)."""

    positions: dict[int, list[np.ndarray]]
    outputs: dict[int, list[np.ndarray]]
    stats: dict[int, LayerStats]


def original_targets(model: onnx.ModelProto, todo: list[ConvInfo], feeds: dict[str, np.ndarray],
                     config: CompressConfig, with_stats: bool = False) -> Targets:
    """One pass of the original model: each layer's outputs at sampled positions (and, with_stats,
    the moments of its original inputs against them)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(config.seed)
    inputs = [model.graph.node[i.node_index].input[0] for i in todo]
    t = Targets({i.node_index: [] for i in todo}, {i.node_index: [] for i in todo},
                {i.node_index: LayerStats.empty(int(np.prod(i.shape[1:])), i.shape[0]) for i in todo})
    for batch in _run(model, inputs, feeds):
        for info, name in zip(todo, inputs):
            x = batch[name]
            geo = _geometry(info, x.shape[2:])
            ho, wo = output_size(x.shape[2:], geo["kernel"], geo["strides"], geo["pads"], geo["dilations"])
            p = min(config.calibration_positions, ho * wo)
            pos = np.argsort(rng.random((len(x), ho * wo)), axis=1)[:, :p]  # (B, p) distinct positions
            rows = im2col_rows(x, pos, **geo)
            w = weights[info.weight_name].reshape(info.shape[0], -1)
            y = rows @ w.T + (weights[info.bias_name] if info.bias_name else 0.0)
            t.positions[info.node_index].append(pos)
            t.outputs[info.node_index].append(y)
            if with_stats and info.group == 1:
                t.stats[info.node_index].add(rows, y)
    return t


def calibrated_plans(model: onnx.ModelProto, infos: list[ConvInfo], feeds: dict[str, np.ndarray],
                     config: CompressConfig, progress: Callable[[str], None] | None = None,
                     targets: Targets | None = None) -> dict[int, LayerPlan]:
    """node index -> LayerPlan for every eligible Conv, fitted on calibration data."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    todo = [i for i in infos if i.eligible]
    inputs = [model.graph.node[i.node_index].input[0] for i in todo]
    # 1. the original model's layer outputs at sampled positions
    targets = targets or original_targets(model, todo, feeds, config)
    positions, outputs = targets.positions, targets.outputs
    # 2. layer by layer, on the inputs of the partly compressed model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    plans: dict[int, LayerPlan] = {}
    done: dict[tuple, LayerPlan] = {}
    for info, name in zip(todo, inputs):
        settings = config.for_layer(info.name)
        key = (info.weight_name, settings)
        w = weights[info.weight_name]
        if key in done:
            plan = done[key]
        elif info.group != 1 or config.scale != "slice":
            plan = plan_layer(info, w, config)  # weight-space fit (see README: limits)
        else:
            stats = LayerStats.empty(int(np.prod(info.shape[1:])), info.shape[0])
            for k, batch in enumerate(_run(work, [name], feeds)):
                x = batch[name]
                geo = _geometry(info, x.shape[2:])
                stats.add(im2col_rows(x, positions[info.node_index][k], **geo), outputs[info.node_index][k])
            base = plan_layer(info, w, config, fit=False)
            fit, bias = fit_output_aware(w, stats, base.slice_dim, base.codebook_size, terms=base.terms,
                                         damp=config.calibration_damp, iterations=config.iterations, seed=config.seed)
            w_hat = from_slices(fit.decode(), info.shape[1], info.shape[2:]).reshape(info.shape[0], -1)
            plan = base.with_fit(fit, relative_error(to_slices(w, base.slice_dim), fit), bias,
                                 output_rel_error=stats.relative_error(w_hat, bias))
        done[key] = plans[info.node_index] = plan
        _install(work, info, plan)
        if progress:
            progress(info.name)
    return plans


def _install(work: onnx.ModelProto, info: ConvInfo, plan: LayerPlan) -> None:
    """Replace the layer's weight (and bias) in the working model by the decoded compressed values."""
    node = work.graph.node[info.node_index]
    n, cg, kh, kw = plan.shape
    w_hat = from_slices(plan.fit.decode(), cg, (kh, kw))
    wname, bname = f"{info.weight_name}__calib{info.node_index}", f"{info.weight_name}__calib_bias{info.node_index}"
    work.graph.initializer.append(numpy_helper.from_array(w_hat.astype(np.float32), wname))
    node.input[1] = wname
    if plan.bias is not None:
        work.graph.initializer.append(numpy_helper.from_array(plan.bias.astype(np.float32), bname))
        if len(node.input) > 2:
            node.input[2] = bname
        else:
            node.input.append(bname)


@dataclass
class Candidates:
    """Every eligible layer's (d, m, k) candidates with their damage, and the bits the convs take."""

    per_layer: dict
    fixed_bits: int  # layers that stay as they are
    total_bits: int  # all conv weights and biases, dense
    targets: Targets

    @property
    def max_ratio(self) -> float:
        """The highest conv ratio the candidates reach (every layer at its smallest setting)."""
        return self.total_bits / (self.fixed_bits + sum(min(c.bits for c in cs) for cs in self.per_layer.values()))

    def settings(self, config: CompressConfig, target_ratio: float) -> tuple[CompressConfig, dict]:
        """Per-layer overrides reaching `target_ratio` with the least summed damage, and the choice table."""
        from .allocate import allocate, overrides_for

        budget = self.total_bits / target_ratio - self.fixed_bits
        if budget <= 0:
            raise ConfigError(f"target ratio {target_ratio:g} is out of reach: the layers left dense alone "
                              f"take {self.fixed_bits} of the {self.total_bits / target_ratio:.0f} bits it allows")
        choice = allocate(self.per_layer, budget)
        table = {name: {"slice_dim": c.slice_dim or None, "codebook_size": c.codebook_size or None,
                        "terms": c.terms or None, "dense": c.dense, "bits": c.bits, "damage": c.damage,
                        "candidates": len(self.per_layer[name])} for name, c in choice.items()}
        return overrides_for(choice, config), table


def layer_candidates_all(model: onnx.ModelProto, infos: list[ConvInfo], feeds: dict[str, np.ndarray],
                         config: CompressConfig) -> Candidates:
    """Fit every eligible layer under each candidate setting on the original inputs (one data pass)."""
    from .allocate import layer_candidates
    from .core import cost

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    todo = [i for i in infos if i.eligible]
    targets = original_targets(model, todo, feeds, config, with_stats=True)
    fixed, total, cands, seen = 0, 0, {}, set()
    for info in infos:
        if info.weight_name in seen or not info.shape or len(info.shape) != 4:
            continue
        seen.add(info.weight_name)
        dense = cost.dense_bits(*info.shape, info.bias_name is not None)
        total += dense
        if not info.eligible or info.group != 1:
            fixed += dense
            continue
        bias = weights[info.bias_name] if info.bias_name else None
        cands[info.name] = layer_candidates(info, weights[info.weight_name], bias,
                                            targets.stats[info.node_index], config)
    if not cands:
        raise ConfigError("choosing settings per layer needs at least one eligible Conv with group=1")
    return Candidates(cands, fixed, total, targets)
