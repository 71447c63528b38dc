"""Running models in onnxruntime: the one place that opens sessions, adds outputs and makes inputs.

    session = open_session(model)                       # original or compressed, nothing else needed
    session_memory(model, feeds)                         # bytes a session takes, in a fresh process
    for batch in run_batches(model, ["conv1_out"], feeds):   # intermediate values, batch by batch
        ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


# The one reader of a process's memory, as source: the measuring children (here, in bench/ and the tests)
# run it without importing onnxstack, whose own imports would be part of what they measure.
VM_STATUS = r"""
def vm_bytes(key="VmHWM"):  # /proc/self/status field in bytes: VmHWM is this address space's peak resident
    with open("/proc/self/status") as f:  # memory (not the parent's, which ru_maxrss carries over fork+exec)
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
"""
exec(VM_STATUS)  # defines vm_bytes here too

_MEMORY_CHILD = VM_STATUS + r"""
import json, sys
import numpy as np
import onnxruntime as ort

model, feeds_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
feeds = dict(np.load(feeds_path))
base = vm_bytes()
opts = ort.SessionOptions()
opts.log_severity_level = 3
if threads:
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
session.run(None, feeds)
print(json.dumps(vm_bytes() - base))
"""


def session_memory(model_or_path, feeds: dict[str, np.ndarray], *, threads: int | None = None,
                   timeout: float = 600) -> int | None:
    """Bytes an onnxruntime session of the model takes: created with default options and run once on
    `feeds`, in a fresh process, as the rise of its peak resident memory (/proc/self/status VmHWM) over
    what the process held after importing onnxruntime and numpy and loading the feeds. None off Linux or
    where the child fails."""
    if not sys.platform.startswith("linux"):
        return None
    with tempfile.TemporaryDirectory(prefix="onnxstack-mem-") as tmp:
        if isinstance(model_or_path, onnx.ModelProto):
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(model_or_path.SerializeToString())
        else:
            path = str(model_or_path)
        feeds_path = os.path.join(tmp, "feeds.npz")
        np.savez(feeds_path, **feeds)
        try:
            out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, path, feeds_path, str(threads or 0)],
                                 capture_output=True, text=True, timeout=timeout, check=True)
            return int(json.loads(out.stdout.strip().splitlines()[-1]))
        except (subprocess.SubprocessError, ValueError, IndexError):
            return None


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
