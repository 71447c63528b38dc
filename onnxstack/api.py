"""The public pipeline: load -> analyse -> plan -> rewrite -> report.

    result = onnxstack.compress("model.onnx", onnxstack.CompressConfig(slice_dim=16))
    result.save("model.stacked.onnx")
    session = onnxstack.open_session(result.model)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__, op
from .analyse import ConvInfo, analyse
from .calibrate import calibrated_plans, choose_settings
from .config import CompressConfig
from .errors import ConfigError, ModelError, NothingToCompressError, OnnxstackError
from .io import save_model_atomic
from .load import load_model
from .plan import LayerPlan, plan_layer
from .report import SUMMARY_KEYS, build_report
from .rewrite import default_opset, rewrite, upgrade_opset


@dataclass
class CompressResult:
    """The compressed model, its report, and the config that made it."""

    model: onnx.ModelProto
    report: dict
    config: CompressConfig
    source: Path | None = None

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically; never over the source model, nor over an existing file unless overwrite."""
        return save_model_atomic(self.model, path, overwrite=overwrite, source=self.source)


def inspect(model_or_path, config: CompressConfig | None = None) -> list[ConvInfo]:
    """Every Conv of the model: eligible, or skipped with a reason."""
    model, _ = load_model(model_or_path)
    return analyse(model, config or CompressConfig())


def compress(model_or_path, config: CompressConfig | None = None, *, data=None, target_ratio: float | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> CompressResult:
    """Compress every eligible Conv of a model (a path or ModelProto); the input is never modified.

    data: calibration inputs: a dict of arrays keyed by input name, an onnxstack.data.Dataset, or a
    path for onnxstack.data.load_data (first 1,000 samples). With it every layer is fitted to preserve
    the original model's outputs (see calibrate.py); without it, to preserve its weights.
    target_ratio: with data, choose slice depth and codebook size per layer to reach this conv ratio
    with the least output damage (see allocate.py); the choice overrides the config's d and m.
    progress(done, total, layer name) is called after each layer is planned.
    """
    config = config or CompressConfig()
    model, path = load_model(model_or_path)
    original_bytes = model.ByteSize()
    infos = analyse(model, config)
    _require_eligible(infos)
    if default_opset(model) < op.MIN_OPSET:
        model = _upgrade_checked(model)
        infos = analyse(model, config)
    feeds = _calibration_feeds(data, model, config.seed) if data is not None else None
    targets, allocation = None, None
    if target_ratio is not None:
        if feeds is None:
            raise ConfigError("a target ratio needs calibration data (--data)")
        if not target_ratio > 1:
            raise ConfigError(f"target ratio must be > 1, got {target_ratio}")
        config, targets, allocation = choose_settings(model, infos, feeds, config, target_ratio)
        infos = analyse(model, config)
    _check_codebook_sizes(infos, config)
    weights = {t.name: t for t in model.graph.initializer}
    plans: dict[tuple, LayerPlan] = {}
    total = sum(i.eligible for i in infos)
    counter = iter(range(1, total + 1))
    report_progress = (lambda name: progress(next(counter), total, name)) if progress else None
    if feeds is not None:
        by_node = calibrated_plans(model, infos, feeds, config, report_progress, targets)
    else:
        by_node = {}
        for info in infos:
            if info.eligible:
                key = (info.weight_name, config.for_layer(info.name))
                if key not in plans:
                    plans[key] = plan_layer(info, numpy_helper.to_array(weights[info.weight_name]), config)
                by_node[info.node_index] = plans[key]
                if report_progress:
                    report_progress(info.name)
    layers = [(info, by_node.get(info.node_index)) for info in infos]
    summary = build_report(layers, original_bytes, 0)
    metadata = {
        "onnxstack.version": __version__,
        "onnxstack.config": config.to_json(),
        "onnxstack.report": json.dumps({k: summary[k] for k in SUMMARY_KEYS}),
    }
    out = rewrite(model, [(i, p) for i, p in layers if p is not None], metadata)
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as e:  # noqa: BLE001 - a failure here is our bug, reported as such
        raise OnnxstackError(f"internal error: the rewritten model fails the ONNX checker: {e}") from None
    report = build_report(layers, original_bytes, out.ByteSize())
    report["calibrated"] = feeds is not None
    if allocation is not None:
        report["target_ratio"] = target_ratio
        report["allocation"] = allocation
    return CompressResult(out, report, config, path)


def open_session(model_or_path, *, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime InferenceSession for an (original or compressed) model; nothing else needed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
        if not Path(source).is_file():
            raise ModelError(f"{source}: no such file")
    try:
        return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model: {' '.join(str(e).split())[:300]}") from None


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float inputs for the graph inputs that are not initializers (symbolic dims -> batch)."""
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _require_eligible(infos: list[ConvInfo]) -> None:
    if any(i.eligible for i in infos):
        return
    if not infos:
        raise NothingToCompressError("the model has no Conv node")
    reasons = sorted({i.reason for i in infos})
    raise NothingToCompressError(f"no eligible Conv among {len(infos)}: {'; '.join(reasons)[:300]}")


def _calibration_feeds(data, model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Calibration arrays keyed by input name, checked against the model."""
    from .data import Dataset, from_arrays, load_data

    if isinstance(data, dict):
        data = from_arrays(data, model)
    elif not isinstance(data, Dataset):
        data = load_data(data, model, limit=1000, seed=seed)
    feeds, _ = data.arrays()
    return feeds


def _check_codebook_sizes(infos: list[ConvInfo], config: CompressConfig) -> None:
    """An explicit m must fit every layer it applies to (checked before any work is done)."""
    for info in infos:
        settings = config.for_layer(info.name)
        if info.eligible and settings.codebook_size is not None:
            n_slices = info.shape[0] * -(-info.shape[1] // settings.slice_dim)
            if settings.codebook_size > n_slices:
                raise ConfigError(f"codebook size m={settings.codebook_size} exceeds the {n_slices} slices of layer "
                                  f"'{info.name}' (weight {list(info.shape)}, d={settings.slice_dim}); "
                                  f"use m <= {n_slices} or skip the layer")


def _upgrade_checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upgrade to op.MIN_OPSET and prove on a random input that the outputs did not change."""
    upgraded = upgrade_opset(model, op.MIN_OPSET)
    try:
        feeds = random_inputs(model)
        before = open_session(model).run(None, feeds)
        after = open_session(upgraded).run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot verify the opset upgrade to {op.MIN_OPSET}: {' '.join(str(e).split())[:200]}") from None
    for a, b in zip(before, after):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise ModelError(f"upgrading opset {default_opset(model)} to {op.MIN_OPSET} changed the outputs; "
                             "export the model at opset >= 12")
    return upgraded
