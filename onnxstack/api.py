"""The public pipeline: load -> analyse -> plan -> rewrite -> report.

    result = onnxstack.compress("model.onnx", onnxstack.CompressConfig(slice_dim=16))
    result.save("model.stacked.onnx")
    session = onnxstack.open_session(result.model)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__, op
from .analyse import ConvInfo, analyse
from .calibrate import calibrated_plans, layer_candidates_all
from .config import CompressConfig
from .errors import ConfigError, ModelError, NothingToCompressError, OnnxstackError
from .io import save_model_atomic
from .load import check_model, load_model, load_model_and_data_files, model_bytes
from .core.fit import one_blas_thread
from .plan import LayerPlan, plan_layer
from .report import SUMMARY_KEYS, build_report
from .rewrite import canonical, default_opset, rewrite, upgrade_opset


@dataclass
class CompressResult:
    """The compressed model, its report, and the config that made it."""

    model: onnx.ModelProto
    report: dict
    config: CompressConfig
    source: Path | None = None
    source_data_files: tuple[Path, ...] = ()  # external data files the source model was read from

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, external_data: bool | None = None,
             inline_functions: bool = False) -> Path:
        """Write atomically; never over the source model (or its data files), nor over an existing file
        unless overwrite.

        external_data: write large tensors to `<path>.data`; None: when the source had external data
        or the model is over 2 GB. inline_functions: expand the com.onnxstack functions into standard
        ops, for runtimes without ONNX-function support (see inline.py)."""
        from .inline import inline_functions as inline

        model = inline(self.model) if inline_functions else self.model
        if external_data is None and self.source_data_files:
            external_data = True
        return save_model_atomic(model, path, overwrite=overwrite, source=self.source, external_data=external_data,
                                 protect=self.source_data_files)


def inspect(model_or_path, config: CompressConfig | None = None) -> list[ConvInfo]:
    """Every Conv of the model: eligible, or skipped with a reason."""
    model, _ = load_model(model_or_path)
    return analyse(canonical(model), config or CompressConfig())


def compress(model_or_path, config: CompressConfig | None = None, *, data=None, target_ratio: float | None = None,
             max_drop: float | None = None, progress: Callable[[int, int, str], None] | None = None
             ) -> CompressResult:
    """Compress every eligible Conv of a model (a path or ModelProto); the input is never modified.

    data: calibration inputs: a dict of arrays keyed by input name (optionally `labels`), an
    onnxstack.data.Dataset, or a path for onnxstack.data.load_data (1,000 samples). With it every layer
    is fitted to preserve the original model's outputs (see calibrate.py); without it, its weights.
    target_ratio: with data, choose slice depth, codebook size and terms per layer to reach this conv
    ratio with the least output damage (see allocate.py); the choice overrides the config's.
    max_drop: with data, the highest ratio whose top-1 accuracy drop (with labels; else 100 - top-1
    agreement) on a held-out quarter of the data stays within max_drop points.
    progress(done, total, layer name) is called after each layer is planned.
    """
    config = config or CompressConfig()
    model, path, data_files = load_model_and_data_files(model_or_path)
    original_bytes = model_bytes(model)
    model = canonical(model)
    infos = analyse(model, config)
    _require_eligible(infos)
    if default_opset(model) < op.MIN_OPSET:
        model = _upgrade_checked(model)
        infos = analyse(model, config)
    feeds, labels = _calibration_data(data, model, config.seed) if data is not None else (None, None)
    extra: dict = {"calibrated": feeds is not None}
    targets = None
    if target_ratio is not None or max_drop is not None:
        if feeds is None:
            raise ConfigError("choosing settings per layer (target ratio, max drop) needs calibration data (--data)")
        if target_ratio is not None and max_drop is not None:
            raise ConfigError("give a target ratio or a maximum drop, not both")
        if target_ratio is not None and not target_ratio > 1:
            raise ConfigError(f"target ratio must be > 1, got {target_ratio}")
        if max_drop is not None and not 0 <= max_drop <= 100:
            raise ConfigError(f"max drop must be in [0, 100] points, got {max_drop}")
        held_out = None
        if max_drop is not None:
            feeds, held_out = _hold_out(feeds, labels, config.seed)
        candidates = layer_candidates_all(model, infos, feeds, config)
        targets = candidates.targets
        if max_drop is not None:
            target_ratio, extra["search"] = _search_ratio(model, infos, candidates, feeds, held_out, config,
                                                          max_drop, original_bytes)
        config, extra["allocation"] = candidates.settings(config, target_ratio)
        extra["target_ratio"] = target_ratio
        infos = analyse(model, config)
    _check_codebook_sizes(infos, config)
    layers = _plan_all(model, infos, feeds, config, targets, progress)
    out, report = _assemble(model, layers, config, original_bytes)
    report.update(extra)
    return CompressResult(out, report, config, path, data_files)


def _plan_all(model, infos, feeds, config, targets=None, progress=None) -> list[tuple[ConvInfo, LayerPlan | None]]:
    """A plan for every eligible layer (calibrated when feeds are given), None for the others."""
    total = sum(i.eligible for i in infos)
    counter = iter(range(1, total + 1))
    report_progress = (lambda name: progress(next(counter), total, name)) if progress else None
    if feeds is not None:
        by_node = calibrated_plans(model, infos, feeds, config, report_progress, targets)
    else:
        by_node = _weight_space_plans(model, infos, config, report_progress)
    return [(info, by_node.get(info.node_index)) for info in infos]


def _weight_space_plans(model, infos, config, report_progress) -> dict[int, LayerPlan]:
    """Plans fitted to the weights alone, layers in parallel threads (largest first; numpy releases the
    GIL in the products that dominate a fit, each of which keeps BLAS to one thread). Layers sharing a
    weight and settings share one fit. The result does not depend on the number of workers."""
    weights = {t.name: t for t in model.graph.initializer}
    users: dict[tuple, list[ConvInfo]] = {}  # (weight, settings) -> the layers that share one fit
    for info in infos:
        if info.eligible:
            users.setdefault((info.weight_name, config.for_layer(info.name)), []).append(info)
    order = sorted(users, key=lambda key: -_elements(weights[key[0]]))
    workers = min(_cpu_count(), len(order)) or 1

    def fit(key):
        return plan_layer(users[key][0], numpy_helper.to_array(weights[key[0]]), config)

    by_node: dict[int, LayerPlan] = {}
    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fit, key): key for key in order}
        for future in as_completed(futures):
            plan = future.result()
            for info in users[futures[future]]:
                by_node[info.node_index] = plan
                if report_progress:
                    report_progress(info.name)
    return by_node


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _assemble(model, layers, config, original_bytes) -> tuple[onnx.ModelProto, dict]:
    """The rewritten, checked model and its report."""
    summary = build_report(layers, original_bytes, 0)
    metadata = {
        "onnxstack.version": __version__,
        "onnxstack.config": config.to_json(),
        "onnxstack.report": json.dumps({k: summary[k] for k in SUMMARY_KEYS}),
    }
    out = rewrite(model, [(i, p) for i, p in layers if p is not None], metadata)
    try:
        check_model(out, full_check=True)
    except Exception as e:  # noqa: BLE001 - a failure here is our bug, reported as such
        raise OnnxstackError(f"internal error: the rewritten model fails the ONNX checker: {e}") from None
    return out, build_report(layers, original_bytes, model_bytes(out))


RATIO_GRID = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _search_ratio(model, infos, candidates, feeds, held_out, config, max_drop, original_bytes):
    """Bisection over RATIO_GRID for the highest ratio whose drop on the held-out data is <= max_drop."""
    val_feeds, val_labels = held_out
    reference = _predict(model, val_feeds)
    log = []

    def drop(ratio):
        cfg, _ = candidates.settings(config, ratio)
        layers = _plan_all(model, analyse(model, cfg), feeds, cfg, candidates.targets)
        out, rep = _assemble(model, layers, cfg, original_bytes)
        pred = _predict(out, val_feeds)
        if val_labels is not None:
            points = 100 * (np.mean(reference == val_labels) - np.mean(pred == val_labels))
        else:
            points = 100 * (1 - np.mean(pred == reference))
        log.append({"target_ratio": ratio, "conv_ratio": rep["conv_ratio"], "drop_points": float(points),
                    "measure": "top-1 accuracy" if val_labels is not None else "top-1 agreement"})
        return points

    grid = [r for r in RATIO_GRID if r <= candidates.max_ratio] or [candidates.max_ratio]
    lo, hi = -1, len(grid)  # invariant: grid[lo] passes (or none yet), grid[hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if drop(grid[mid]) <= max_drop else (lo, mid)
    if lo < 0:
        raise OnnxstackError(f"no ratio keeps the drop within {max_drop} points: at {grid[0]:g}x the drop is "
                             f"{log[-1]['drop_points']:.2f} points on {len(reference)} held-out samples")
    return float(grid[lo]), log


def _predict(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """Top-1 class of the first output, in batches."""
    sess = open_session(model)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out).reshape(n, -1).argmax(1)


def _hold_out(feeds, labels, seed):
    """(calibration feeds, (held-out feeds, held-out labels)): a seeded random quarter is held out."""
    n = len(next(iter(feeds.values())))
    if n < 8:
        raise ConfigError(f"--max-drop needs at least 8 samples to hold some out, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    calib, held = np.sort(order[n // 4:]), np.sort(order[: n // 4])
    return ({k: v[calib] for k, v in feeds.items()},
            ({k: v[held] for k, v in feeds.items()}, labels[held] if labels is not None else None))


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


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0, size: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Random float inputs for the graph inputs that are not initializers (symbolic dims -> batch; with
    size, symbolic dims after the first -> size)."""
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else (size if size and k else batch)
                 for k, d in enumerate(tt.shape.dim)]
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _require_eligible(infos: list[ConvInfo]) -> None:
    if any(i.eligible for i in infos):
        return
    if not infos:
        raise NothingToCompressError("the model has no Conv node")
    reasons = sorted({i.reason for i in infos})
    raise NothingToCompressError(f"no eligible Conv among {len(infos)}: {'; '.join(reasons)[:300]}")


def _calibration_data(data, model: onnx.ModelProto, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Calibration arrays keyed by input name, checked against the model, and labels if any."""
    from .data import Dataset, from_arrays, load_data

    if isinstance(data, dict):
        data = from_arrays(data, model)
    elif not isinstance(data, Dataset):
        data = load_data(data, model, limit=1000, seed=seed)
    return data.arrays()


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
        sessions = open_session(model), open_session(upgraded)
        for size in (None, 32, 64, 224, 1024):  # symbolic sizes to try until the original model runs
            feeds = random_inputs(model, size=size)
            try:
                before = sessions[0].run(None, feeds)
                break
            except Exception:  # noqa: BLE001 - this size does not fit the model; try the next
                if size == 1024:
                    raise
        after = sessions[1].run(None, feeds)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot verify the opset upgrade to {op.MIN_OPSET}: {' '.join(str(e).split())[:200]}") from None
    for a, b in zip(before, after):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise ModelError(f"upgrading opset {default_opset(model)} to {op.MIN_OPSET} changed the outputs; "
                             "export the model at opset >= 12")
    return upgraded
