"""The public API: compress, inspect, and the result a pipeline gets back (the stages: pipeline.py).

    result = onnxstack.compress("model.onnx", onnxstack.CompressConfig(slice_dim=16))
    result.save("model.stacked.onnx")
    session = onnxstack.open_session(result.model)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from . import pipeline
from .analyse import ConvInfo, analyse
from .config import CompressConfig
from .io import save_model_atomic
from .load import load_model
from .normalise import canonical
from .runtime import open_session, random_inputs  # noqa: F401 - part of the API

__all__ = ["CompressResult", "compress", "inspect", "open_session", "random_inputs"]


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
             max_drop: float | None = None, progress: Callable[[int, int, str], None] | None = None,
             reconstruct=None) -> CompressResult:
    """Compress every eligible Conv of a model (a path or ModelProto); the input is never modified.

    data: calibration inputs: a dict of arrays keyed by input name (optionally `labels`), an
    onnxstack.data.Dataset, or a path for onnxstack.data.load_data (1,000 samples). With it every layer
    is fitted to preserve the original model's outputs (see calibrate.py); without it, its weights.
    target_ratio: with data, choose slice depth, codebook size and terms per layer to reach this conv
    ratio with the least output damage (see search.py); the choice overrides the config's.
    max_drop: with data, the highest ratio whose top-1 accuracy drop (with labels; else 100 - top-1
    agreement) on a held-out quarter of the data stays within max_drop points.
    progress(done, total, item) is called after each layer is planned (item: the layer's name) and, under a
    target ratio or max drop, after each layer's candidates are measured (item: "choosing settings: NAME").
    reconstruct: with data, block reconstruction after the fit (needs torch; see pipeline.reconstruct_stage):
    True runs it, a torch_bridge.reconstruct.ReconstructConfig tunes it, None / False skip it (opt-in: each block
    is kept only if held-out outputs improve, and on the sample models no block did).
    """
    out, report, used, source = pipeline.run(model_or_path, config or CompressConfig(), data, target_ratio,
                                             max_drop, progress, reconstruct)
    return CompressResult(out, report, used, source.path, source.data_files)
