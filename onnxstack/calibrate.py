"""The calibration data passes: what the output-aware fitters learn from.

`original_targets` runs the original model once: each layer's outputs at sampled positions (only a fixed
number of positions per image is kept: bounded memory). The fit stage then takes the layers in graph
order; for each one `layer_stats` runs the calibration images through the working model, in which the
earlier layers are already compressed (`install`), so layer l is fitted on the inputs it will see at
run time, against the *original* model's outputs. The math is in core/calib.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .analyse import ConvInfo
from .config import CompressConfig
from .core.calib import LayerStats, im2col_rows, output_size
from .core.conv import resolve_pads
from .plan import IntPlan, LayerPlan
from .runtime import run_batches


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
    the moments of its original inputs against them). Layers with group > 1 are left out: no output-aware
    fitter takes them (see fitters.choose)."""
    todo = [i for i in todo if i.group == 1]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(config.seed)
    inputs = [model.graph.node[i.node_index].input[0] for i in todo]
    t = Targets({i.node_index: [] for i in todo}, {i.node_index: [] for i in todo},
                {i.node_index: LayerStats.empty(int(np.prod(i.shape[1:])), i.shape[0]) for i in todo})
    for batch in run_batches(model, inputs, feeds):
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
            if with_stats:
                t.stats[info.node_index].add(rows, y)
    return t


def layer_stats(work: onnx.ModelProto, info: ConvInfo, feeds: dict[str, np.ndarray], targets: Targets) -> LayerStats:
    """Moments of the layer's inputs in the working model against the original outputs at the same positions."""
    name = work.graph.node[info.node_index].input[0]
    stats = LayerStats.empty(int(np.prod(info.shape[1:])), info.shape[0])
    for k, batch in enumerate(run_batches(work, [name], feeds)):
        x = batch[name]
        geo = _geometry(info, x.shape[2:])
        stats.add(im2col_rows(x, targets.positions[info.node_index][k], **geo), targets.outputs[info.node_index][k])
    return stats


def install(work: onnx.ModelProto, info: ConvInfo, plan: LayerPlan | IntPlan) -> None:
    """Replace the layer's weight (and bias) in the working model by the decoded compressed values."""
    node = work.graph.node[info.node_index]
    w_hat = plan.decoded_weight()
    wname, bname = f"{info.weight_name}__calib{info.node_index}", f"{info.weight_name}__calib_bias{info.node_index}"
    work.graph.initializer.append(numpy_helper.from_array(w_hat.astype(np.float32), wname))
    node.input[1] = wname
    if plan.bias is not None:
        work.graph.initializer.append(numpy_helper.from_array(plan.bias.astype(np.float32), bname))
        if len(node.input) > 2:
            node.input[2] = bname
        else:
            node.input.append(bname)
