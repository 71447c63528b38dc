"""The compression pipeline, top-down: one function a stage, each over values it does not share.

    load -> normalise -> analyse -> (opset) -> calibration data -> allocate -> fit -> rewrite -> report

| stage      | module                      | in -> out                                                    |
|------------|-----------------------------|--------------------------------------------------------------|
| load       | load.py                     | path or ModelProto -> checked model (+ its external data)    |
| normalise  | normalise.py                | model -> canonical model (constants folded, 1-D lifted)      |
| analyse    | analyse.py                  | model, config -> ConvInfo per Conv (eligible, or a reason)   |
| data       | data.py (+ npzread.py)      | dataset/arrays/path -> a Dataset checked against the inputs  |
| allocate   | search.py                   | target ratio / max drop -> per-layer settings in the config  |
| fit        | fitters.py (+ calibrate.py) | layers -> LayerPlan each (the fitter, and any fallback why)  |
| rewrite    | rewrite.py                  | model + plans -> model with StackedBinaryConv nodes          |
| report     | report.py                   | plans + sizes -> the report dict and table                   |

`onnxstack.compress` (api.py) calls `run`; nothing below imports this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from . import __version__, op
from .analyse import ConvInfo, analyse
from .config import CompressConfig
from .core import cost
from .core.bits import packed_rows
from .core.fit import ceil_div, slice_depth
from .errors import ConfigError, ModelError, NothingToCompressError, OnnxstackError, one_line
from .fitters import fit_layers
from .load import check_model, load_model_and_data_files, model_bytes
from .normalise import default_opset, normalise, upgrade_checked
from .plan import LayerPlan
from .report import SUMMARY_KEYS, already_compressed, build_report
from .rest import store_rest
from .rewrite import rewrite
from .search import TARGET_TOLERANCE, Candidates, end_to_end, hold_out, layer_candidates_all, search_ratio

log = logging.getLogger("onnxstack")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Source:
    """The model after the load and normalise stages, with where it came from."""

    model: onnx.ModelProto
    path: object  # Path | None
    data_files: tuple
    original_bytes: int


@dataclass(frozen=True)
class Settings:
    """The allocate stage's answer: the config every layer is fitted under, and what the search recorded."""

    config: CompressConfig
    infos: list[ConvInfo]
    candidates: Candidates | None = None
    record: dict = field(default_factory=dict)
    feeds: object = None  # the calibration feeds the fit uses: a Dataset (default path) or arrays (a search
    # has read them; less a held-out part under max drop)
    alternatives: tuple = ()  # (label, config, allocation table): allocations to build and measure end to end


def run(model_or_path, config: CompressConfig, data=None, target_ratio: float | None = None,
        max_drop: float | None = None, progress: Progress | None = None, reconstruct=None):
    """(compressed model, report, config used, source): the stages in order."""
    source = load_stage(model_or_path)
    searching = data is not None and (target_ratio, max_drop) != (None, None)
    model, infos, opset_record = opset_stage(source.model, config, searching)
    feeds, labels, data_check = calibration_data(data, model, config.seed) if data is not None else (None, None, None)
    settings = allocate_stage(model, infos, feeds, labels, config, target_ratio, max_drop, source.original_bytes,
                              progress)
    settings, plans, out, report = build_stage(model, settings, source.original_bytes, progress)
    report.update({"calibrated": feeds is not None, **settings.record})
    target = settings.record.get("target_ratio")
    if target and report["conv_ratio"] > TARGET_TOLERANCE * target:
        report["target_note"] = (f"the settings with the least measured damage within the bits of {target:g}x "
                                 f"reach {report['conv_ratio']:.1f}x: no choice nearer {target:g}x measured less "
                                 "damage (more bits buy nothing there)")
        log.warning("%s", report["target_note"])
    if opset_record:
        report["opset"] = opset_record
    if data_check is not None:
        report["data_check"] = data_check
    out, report["reconstruction"] = reconstruct_stage(model, out, settings.feeds, plans, reconstruct)
    if report["reconstruction"].get("kept"):
        report.update({k: v for k, v in build_report(plans, source.original_bytes, model_bytes(out)).items()
                       if k in ("compressed_bytes", "file_ratio")})
    return out, report, settings.config, source


def reconstruct_stage(model, out, feeds, plans, option) -> tuple[onnx.ModelProto, dict]:
    """Block reconstruction (torch_bridge/reconstruct.py) of the fitted model, when there are data and binary
    layers: opt-in (True, or a ReconstructConfig to tune it; None and False skip it). Held out per block it
    is safe (a block that does not pay is put back), but on the sample models at 16x and 32x no block paid:
    sign-STE training from the output-aware closed form raised even the training block loss, so the
    default would only cost time (bench/results/reconstruct.md).

    A seeded eighth of the calibration data is held out; the reconstructed model is kept only if its outputs
    there are closer to the original's than the closed-form model's. Inside, each block keeps its trained
    values only if the model's output error on a further held-out part of the training images drops."""
    if not option or feeds is None:
        return out, {"ran": False, "why": "not asked for" if not option else "no calibration data"}
    if not any(p is not None and getattr(p, "representation", "binary") == "binary" for _, p in plans):
        return out, {"ran": False, "why": "no binary layer to reconstruct"}
    try:
        from .torch_bridge.graph import UnsupportedOpError
        from .torch_bridge.reconstruct import ReconstructConfig, reconstruct
    except ImportError:
        if option is not None:
            raise ConfigError("reconstruction needs torch: pip install 'onnxstack[torch]'") from None
        return out, {"ran": False, "why": "torch is not installed (pip install 'onnxstack[torch]')"}
    feeds = as_arrays(feeds)
    n = len(next(iter(feeds.values())))
    if n < 16:
        return out, {"ran": False, "why": f"{n} calibration samples; reconstruction needs at least 16"}
    order = np.random.default_rng(0).permutation(n)
    held, train = np.sort(order[: max(n // 8, 8)]), np.sort(order[max(n // 8, 8):])
    config = option if isinstance(option, ReconstructConfig) else ReconstructConfig()  # True: the defaults
    try:
        rebuilt, record = reconstruct(model, out, {k: v[train] for k, v in feeds.items()}, config)
    except UnsupportedOpError as e:  # the closed-form model stands; the report and the CLI say why
        return out, {"ran": False, "why": f"{e}; the closed-form fit is kept"}
    before, after = (_output_error(model, m, {k: v[held] for k, v in feeds.items()}) for m in (out, rebuilt))
    kept = after < before
    record.update({"ran": True, "kept": bool(kept), "held_out_samples": len(held),
                   "held_out_output_error": {"closed_form": before, "reconstructed": after}})
    return (rebuilt if kept else out), record


def _output_error(original, compressed, feeds) -> float:
    """Relative squared error of the compressed model's float outputs against the original's."""
    from .runtime import open_session

    ref, got = open_session(original).run(None, feeds), open_session(compressed).run(None, feeds)
    return float(sum(np.sum((a - b) ** 2) / max(np.sum((b - b.mean()) ** 2), 1e-30)
                     for a, b in zip(got, ref) if np.issubdtype(b.dtype, np.floating)))





def as_arrays(feeds) -> dict[str, np.ndarray] | None:
    """Calibration feeds in memory: a Dataset's samples (all of them) read now; a dict as it is."""
    return feeds.arrays()[0] if feeds is not None and not isinstance(feeds, dict) else feeds


def opset_stage(model: onnx.ModelProto, config: CompressConfig, searching: bool):
    """(model, its ConvInfos, the opset record): the loaded model with at least one eligible Conv, upgraded
    to op.MIN_OPSET when below it and to what the integer weights in play need (int_opset); `searching`:
    a settings search will run (it offers int4 per layer)."""
    infos = analyse(model, config)
    require_eligible(infos)
    if default_opset(model) < op.MIN_OPSET:
        model = upgrade_checked(model)
        infos = analyse(model, config)
    model, record = int_opset(model, config, searching)
    if record.get("upgraded"):
        infos = analyse(model, config)
    return model, infos, record


def load_stage(model_or_path) -> Source:
    model, path, data_files = load_model_and_data_files(model_or_path)
    again = already_compressed(model)
    if again:
        raise ModelError(f"{path or 'model'}: {again}")
    original_bytes = model_bytes(model)
    return Source(normalise(model), path, data_files, original_bytes)


def allocate_stage(model, infos, feeds, labels, config, target_ratio, max_drop, original_bytes,
                   progress: Progress | None = None) -> Settings:
    """The config as given, or with the per-layer settings the target ratio or the maximum drop calls for."""
    check_search_options(config, feeds, target_ratio, max_drop)
    if target_ratio is None and max_drop is None:
        check_codebook_sizes(infos, config)
        return Settings(config, infos, feeds=feeds)  # a Dataset: the fit's walk reads it a batch at a time
    feeds = as_arrays(feeds)
    record: dict = {}
    held_out = None
    if max_drop is not None:
        feeds, held_out = hold_out(feeds, labels, config.seed)
    candidates = layer_candidates_all(model, infos, feeds, config, progress)
    if max_drop is not None:
        def build(cfg):
            s = Settings(cfg, analyse(model, cfg), candidates, feeds=feeds)
            return assemble(model, s.infos, fit_stage(model, s), cfg, original_bytes)
        target_ratio, record["search"] = search_ratio(model, candidates, held_out, config, max_drop, build)
    record["target_ratio"] = target_ratio
    if max_drop is not None:  # the search has measured its ratios end to end already
        config, record["allocation"] = candidates.settings(config, target_ratio)
        alternatives = ()
    else:
        alternatives = tuple((label, *candidates.apply(config, choice)) for label, choice in candidates.choices(target_ratio))
        _, config, record["allocation"] = alternatives[0]
    infos = analyse(model, config)
    check_codebook_sizes(infos, config)
    return Settings(config, infos, candidates, record, feeds, alternatives if len(alternatives) > 1 else ())


CHECK_SAMPLES = 128  # held-out calibration samples the allocation check measures the built alternatives on


def build_stage(model, settings: Settings, original_bytes, progress: Progress | None = None):
    """(settings, plans, model, report): the fit, rewrite and report stages. Where the allocate stage left
    alternative allocations (search.Candidates.choices), each is built from the calibration samples
    outside calibrate.held_out_mask and measured end to end on up to CHECK_SAMPLES of the held-out ones
    (search.end_to_end); the one whose outputs move least there is fitted again on every sample and kept.
    Measured on the samples it was fitted on, the check preferred what fits them best (EfficientNet-Lite0
    at 16x on 64 crops: its FC int4 and every conv starved, 0 % agreement on other crops). With too few
    samples to hold any out it measures on the fitted ones, and says so. The report's "allocation_check"
    lists every alternative."""
    if not settings.alternatives:
        plans = fit_stage(model, settings, progress)
        return (settings, plans, *assemble(model, settings.infos, plans, settings.config, original_bytes))
    from .calibrate import held_out_mask
    from .runtime import run_batches

    n_samples = len(next(iter(settings.feeds.values())))
    held = held_out_mask(n_samples, settings.config.seed)
    fit_feeds = settings.feeds if held is None else {k: v[~held] for k, v in settings.feeds.items()}
    feeds = {k: (v if held is None else v[held])[:CHECK_SAMPLES] for k, v in settings.feeds.items()}
    names = [o.name for o in model.graph.output]
    reference = list(run_batches(model, names, feeds))
    best, rows = None, []
    n = len(settings.alternatives)
    for i, (label, config, table) in enumerate(settings.alternatives):
        s = replace(settings, config=config, infos=analyse(model, config), alternatives=(), feeds=fit_feeds,
                    record={**settings.record, "allocation": table})
        step = None  # one count over all the builds, each item named by the allocation it belongs to
        if progress:
            def step(done, total, item, i=i, label=label):
                progress(i * total + done, (n + 1) * total, f"checking allocation {i + 1}/{n} ({label}): {item}")
        plans = fit_stage(model, s, step)
        out, report = assemble(model, s.infos, plans, config, original_bytes)
        moved = end_to_end(reference, run_batches(out, names, feeds))
        rows.append({"allocation": label, "conv_ratio": report["conv_ratio"],
                     **{k: v for k, v in moved.items() if k != "measure"}})
        log.info("allocation check: %s -> %.2fx, %s", label, report["conv_ratio"],
                 ", ".join(f"{k} {v:.4g}" for k, v in moved.items() if isinstance(v, float)))
        if best is None or moved["rank"] < best[0]["rank"]:
            best = (moved, s, plans, out, report)
    for row in rows:
        row["kept"] = row.pop("rank") == best[0]["rank"] and not any(r.get("kept") for r in rows)
    moved, s, plans, out, report = best
    if held is not None:  # the kept allocation, fitted on every sample
        s = replace(s, feeds=settings.feeds)
        step = None
        if progress:
            def step(done, total, item):
                progress(n * total + done, (n + 1) * total, f"fitting the kept allocation: {item}")
        plans = fit_stage(model, s, step)
        out, report = assemble(model, s.infos, plans, s.config, original_bytes)
    s.record["allocation_check"] = {"samples": len(next(iter(feeds.values()))), "held_out": held is not None,
                                    "measure": moved["measure"], "tried": rows}
    return s, plans, out, report


def fit_stage(model, settings: Settings, progress: Progress | None = None) -> list[tuple[ConvInfo, LayerPlan | None]]:
    """A plan for every eligible layer (calibrated when the settings carry feeds), None for the others."""
    infos, feeds = settings.infos, settings.feeds
    total = sum(i.eligible for i in infos)
    counter = iter(range(1, total + 1))
    report_progress = (lambda name: progress(next(counter), total, name)) if progress else None
    by_node = fit_layers(model, infos, feeds, settings.config, report_progress)
    return [(info, by_node.get(info.node_index)) for info in infos]


def memory_guard(layers: list) -> tuple[list, dict | None]:
    """Execution "auto": the layers whose form the cost model chose dense run lean where the predicted
    session memory would otherwise pass the original's (core.cost.memory_plan). Returns the layers and what
    the report says of it (None when no layer's form was chosen by "auto")."""
    plans: dict[int, LayerPlan] = {}  # one entry a stored weight (layers sharing a weight share its plan)
    pixels: dict[int, int | None] = {}
    for info, p in layers:
        if isinstance(p, LayerPlan):
            plans.setdefault(id(p), p)
            px = [v for v in (pixels.get(id(p)), info.pixels) if v is not None]
            pixels[id(p)] = min(px) if px else None
    binary = list(plans.values())
    if not any(p.auto_form for p in binary):
        return layers, None
    def row(p: LayerPlan) -> tuple:
        weight = 4 * int(np.prod(p.shape))
        form = "dense" if p.auto_form and p.execution == "dense" else "fixed" if p.execution == "dense" else p.execution
        merge = 4 * p.shape[0] * p.fit.indices.shape[1] * 8 * packed_rows(p.codebook_size)  # (N, s*M') floats
        return weight, pixels[id(p)], form, {"stacked": merge, "lean": 0}.get(form, weight)

    rows = [row(p) for p in binary]
    lean, predicted = cost.memory_plan(rows)
    swap = {id(binary[j]): replace(binary[j], execution="lean") for j in lean}
    out = [(info, swap.get(id(p), p)) for info, p in layers]
    names = [binary[j].name for j in sorted(lean)]
    return out, {"goal": "session memory at most the original's (predicted for the compressed layers' weights)",
                 "predicted_original_bytes": predicted["original"], "predicted_bytes": predicted["predicted"],
                 "lean": names}


def assemble(model, infos, layers, config, original_bytes) -> tuple[onnx.ModelProto, dict]:
    """The rewrite and report stages: the rewritten, checked model and its report."""
    layers, guard = memory_guard(layers)
    summary = build_report(layers, original_bytes, 0)
    metadata = {
        "onnxstack.version": __version__,
        "onnxstack.config": config.to_json(),
        "onnxstack.report": json.dumps({k: summary[k] for k in SUMMARY_KEYS}),
    }
    out = rewrite(model, [(i, p) for i, p in layers if p is not None], metadata)
    rest = store_rest(out, config.rest)  # what compression left float: kept, or int8 per channel (--rest)
    try:
        check_model(out, full_check=True)
    except Exception as e:  # noqa: BLE001 - a failure here is our bug, reported as such
        raise OnnxstackError(f"internal error: the rewritten model fails the ONNX checker: {one_line(e)}") from None
    report = {**build_report(layers, original_bytes, model_bytes(out)), "rest": rest}
    if guard is not None:
        report["memory_guard"] = guard
    return out, report


# --- checks made before any work -------------------------------------------------------------------


def require_eligible(infos: list[ConvInfo]) -> None:
    if any(i.eligible for i in infos):
        return
    if not infos:
        raise NothingToCompressError("the model has no Conv node")
    reasons = sorted({i.reason for i in infos})
    raise NothingToCompressError(f"no eligible Conv among {len(infos)}: {'; '.join(reasons)[:300]}")


def int_opset(model: onnx.ModelProto, config: CompressConfig, searching: bool) -> tuple[onnx.ModelProto, dict]:
    """Integer weights need a newer DequantizeLinear: int4 that of opset 21 (where int4 is in play: a settings
    search, whose ladder offers int4 per layer, or a layer override asking for representation "int4"), the
    per-channel int8 of `--rest int8` that of opset 13. An older model is upgraded when onnx's converter can
    and the outputs stay the same on a random input; else it stays, those weights stay as they would at its
    opset (no int4 layers; rest float), and the record says why."""
    from .fitters import INT4_MIN_OPSET
    from .rest import MIN_OPSET as REST_MIN_OPSET

    have = default_opset(model)
    if searching or any(o.representation == "int4" for o in config.overrides.values()):
        need, why, otherwise = INT4_MIN_OPSET, "int4 weights (DequantizeLinear of opset 21)", "no int4 layers"
    elif config.rest == "int8":
        need, why, otherwise = REST_MIN_OPSET, "--rest int8 (per-channel DequantizeLinear of opset 13)", "rest float"
    else:
        return model, {}
    if have >= need:
        return model, {}
    try:
        return upgrade_checked(model, need), {"upgraded": f"{have} -> {need}", "why": why}
    except OnnxstackError as e:
        return model, {"upgraded": None, "why": f"kept opset {have}, so {otherwise}: {one_line(e, 200)}"}


def check_search_options(config: CompressConfig, feeds, target_ratio, max_drop) -> None:
    if target_ratio is None and max_drop is None:
        return
    if feeds is None:
        raise ConfigError("choosing settings per layer (target ratio, max drop) needs calibration data (--data)")
    if target_ratio is not None and max_drop is not None:
        raise ConfigError("give a target ratio or a maximum drop, not both")
    if target_ratio is not None and not target_ratio > 1:
        raise ConfigError(f"target ratio must be > 1, got {target_ratio}")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise ConfigError(f"max drop must be in [0, 100] points, got {max_drop}")
    if config.codebook_size is not None:
        raise ConfigError("a target ratio or maximum drop chooses the codebook size per layer; "
                          "leave the codebook size unset (or give per-layer settings without a target)")


def check_codebook_sizes(infos: list[ConvInfo], config: CompressConfig) -> None:
    """An explicit m must fit every layer it applies to (checked before any work is done)."""
    for info in infos:
        settings = config.for_layer(info.name)
        if info.eligible and settings.codebook_size is not None and settings.int_bits is None:
            n_slices = info.shape[0] * ceil_div(info.shape[1], slice_depth(settings.slice_dim, info.shape[1]))
            if settings.codebook_size > n_slices:
                raise ConfigError(f"codebook size m={settings.codebook_size} exceeds the {n_slices} slices of layer "
                                  f"'{info.name}' (weight {list(info.shape)}, d={settings.slice_dim}); "
                                  f"use m <= {n_slices} or skip the layer")


def calibration_data(data, model: onnx.ModelProto, seed: int):
    """(Dataset, labels if any, findings of the data check): the calibration data checked against the model
    (finite values) and checked for near-duplicates and too few samples (warned, and kept in the report).
    Both checks read a batch at a time: the Dataset of a .npz holds no samples (stages that need arrays,
    the settings search and reconstruction, take them with dataset.arrays())."""
    from .data import Dataset, from_arrays, load_data
    from .dataquality import check_dataset, warn
    from .errors import DataError

    if isinstance(data, dict):
        data = from_arrays(data, model)
    elif not isinstance(data, Dataset):
        data = load_data(data, model, limit=1000, seed=seed)
    bad: dict[str, list[int]] = {}  # input -> [non-finite values, samples holding one]
    for feeds, _ in data.batches(data.batch_for(BATCH_BYTES, 1024)):
        for name, arr in feeds.items():
            count = bad.setdefault(name, [0, 0])
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                count[0] += int(arr.size - np.isfinite(arr).sum())
                count[1] += int((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1).sum())
    for name, (values, samples) in bad.items():
        if values:
            raise DataError(f"calibration data for input '{name}' holds {values} NaN or Inf value(s) in {samples} "
                            f"of {len(data)} samples; clean or drop those samples")
    findings = check_dataset(data, seed=seed)
    warn(findings)
    return data, data.labels, findings.to_dict()


BATCH_BYTES = 8 << 20  # feeds read at once by the calibration data checks
