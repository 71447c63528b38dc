"""Running models in onnxruntime: the one place that opens sessions, adds outputs and makes inputs.

    session = open_session(model)                       # original or compressed, nothing else needed
    for batch in run_batches(model, ["conv1_out"], feeds):   # intermediate values, batch by batch
        ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import ModelError, one_line

BATCH = 64


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
        raise ModelError(f"onnxruntime cannot load the model: {one_line(e)}") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The model (a copy, when names adds any) that also returns the named intermediate tensors, untyped
    (onnxruntime infers them)."""
    have = {o.name for o in model.graph.output}
    extra = [n for n in dict.fromkeys(names) if n not in have]
    if not extra:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in extra)
    return out


def run_batches(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray], batch: int = BATCH
                ) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of the feeds, {name: array} of the named tensors (graph inputs are passed through)."""
    wanted = [n for n in names if n not in feeds]
    sess = open_session(with_outputs(model, wanted)) if wanted else None
    n = len(next(iter(feeds.values())))
    for start in range(0, n, batch):
        part = {k: v[start:start + batch] for k, v in feeds.items()}
        got = dict(zip(wanted, sess.run(wanted, part))) if sess else {}
        yield {name: part[name] if name in part else got[name] for name in names}


def predict_top1(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """Top-1 class of the first output, in batches."""
    sess = open_session(model)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out).reshape(n, -1).argmax(1)


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0, size: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Random inputs for the graph inputs that are not initializers. A dim that is symbolic, unknown or
    not positive (some exporters write -1 or 0 for a dynamic one) becomes `batch` on the first axis and
    `size` (default 32) on the others."""
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (size or 32 if k else batch)
                 for k, d in enumerate(tt.shape.dim)]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.random(shape) < 0.5
        else:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
