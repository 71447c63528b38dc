"""Session memory: runtime.session_memory measures it, and the execution forms hold what they say they hold
(dense: float weights folded at session start; lean: only the packed tensors, the weight decoded at run time)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxstack
from onnxstack.runtime import VM_STATUS, session_memory

from .models import conv_model, run_ort

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory from /proc: Linux")
MB = 2 ** 20


@pytest.fixture(scope="module")
def wide():
    """Three 3x3 convs of 512 channels: 28 MB of float weights, tiny activations (4x4 maps)."""
    return conv_model([{"in": 512, "out": 512, "pads": [1] * 4}] * 3, hw=(4, 4))


def feeds(model, batch=1):
    shape = [batch, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 4, 4]
    return {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def optimized_ops(model: onnx.ModelProto) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)


def test_session_memory_counts_the_weights(wide):
    small = conv_model([{"in": 8, "out": 8, "pads": [1] * 4}], hw=(4, 4))
    big, little = session_memory(wide, feeds(wide)), session_memory(small, feeds(small))
    assert isinstance(big, int) and isinstance(little, int)
    assert big - little > 28 * MB  # the session holds at least one float copy of the 28 MB of weights


@pytest.fixture(scope="module")
def forms(wide):
    return {f: onnxstack.compress(wide, onnxstack.CompressConfig(execution=f)).model for f in ("dense", "lean")}


def test_lean_decodes_at_run_time_and_dense_at_session_start(wide, forms):
    dense, lean = optimized_ops(forms["dense"]), optimized_ops(forms["lean"])
    assert dense["Gather"] == 0 and dense["MatMul"] == 0  # folded into float weights
    assert lean["Gather"] == 3  # one decode a layer, run at every call
    x = feeds(wide, batch=2)
    a, b = run_ort(forms["dense"], x)[0], run_ort(forms["lean"], x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_lean_needs_less_memory_than_the_original(wide, forms):
    x = feeds(wide)
    original, lean = session_memory(wide, x), session_memory(forms["lean"], x)
    assert lean < original / 2, (lean / MB, original / MB)


def test_lean_inlined_into_standard_ops_gives_the_same_outputs(wide, forms):
    from onnxstack.inline import inline_functions

    inlined = inline_functions(forms["lean"])
    onnx.checker.check_model(inlined, full_check=True)
    assert not inlined.functions and all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
    x = feeds(wide, batch=2)
    a, b = run_ort(forms["lean"], x)[0], run_ort(inlined, x)[0]
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


# --- calibration: memory stays flat in the number of images (issue 13) ------------------------------------

CALIBRATE_CHILD = VM_STATUS + """
import sys
import numpy as np
import onnx
import onnxstack
from onnxstack.data import load_data

model = onnx.load(sys.argv[1])
before = vm_bytes("VmRSS")
result = onnxstack.compress(model, onnxstack.CompressConfig(slice_dim=8), data=load_data(sys.argv[2], model))
assert result.report['calibrated'] and result.report['data_check']['samples'] == int(sys.argv[3])
print(vm_bytes(), before)
"""


def _calibration_peak(tmp_path, model, n: int) -> tuple[int, int]:
    """(peak resident bytes, resident bytes before compress) of a fresh process compressing `model` on n
    stored samples of 1x64x64 float32 (a .npz np.savez wrote)."""
    import subprocess

    x = np.random.default_rng(n).standard_normal((n, 1, 64, 64)).astype(np.float32)
    data = tmp_path / f"calib{n}.npz"
    np.savez(data, input=x)
    del x
    model_path = tmp_path / "model.onnx"
    onnx.save(model, model_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CALIBRATE_CHILD, str(model_path), str(data), str(n)], env=env,
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, before = map(int, out.stdout.split())
    return peak, before


def test_calibration_memory_stays_flat_in_the_number_of_images(tmp_path):
    """2,000 samples (33 MB on file) peak within a few MB of 200: the .npz is read a batch at a time by the
    data checks and the walk, never held whole."""
    model = conv_model([{"in": 1, "out": 8, "pads": [1] * 4}, {"out": 8, "pads": [1] * 4}], hw=(64, 64))
    small, _ = _calibration_peak(tmp_path, model, 200)
    large, _ = _calibration_peak(tmp_path, model, 2000)
    assert large - small < 15 * MB, ((large - small) / MB, small / MB, large / MB)


# --- execution "auto": lean where the session would otherwise need more memory than the original's -----


def test_memory_plan_runs_the_fewest_pixels_lean_first_until_the_prediction_fits():
    from onnxstack.core import cost

    mb = 1 << 20
    # (bytes, pixels, form): two wide 3x3 layers on small maps, one early layer on a big map, an FC
    layers = [(b, px, "dense", b) for b, px in [(2 * mb, 3136), (9 * mb, 49), (9 * mb, 196), (8 * mb, 1)]]
    lean, pred = cost.memory_plan(layers)
    assert pred["predicted"] <= pred["original"]
    assert 3 in lean and 0 not in lean  # the FC (1 pixel) before anything, the 56x56 layer last
    assert lean == set(sorted(range(4), key=lambda i: layers[i][1])[:len(lean)])  # a prefix by pixels
    # everything dense would pass the original's memory (the reason for the guard)
    assert sum(cost.MEMORY_DENSE["fc" if p == 1 else "conv"] * b for b, p, _, _ in layers) > pred["original"]


def test_memory_plan_keeps_forms_the_user_chose():
    from onnxstack.core import cost

    small_merge = [(8 << 20, 49, "fixed", 8 << 20), (8 << 20, 49, "stacked", 1 << 20), (1 << 20, 196, "dense", 1 << 20)]
    lean, pred = cost.memory_plan(small_merge)
    assert lean == set() and pred["predicted"] <= pred["original"]  # a small merge matrix leaves room
    big_merge = [(8 << 20, 49, "stacked", 16 << 20), (1 << 20, 196, "dense", 1 << 20)]
    lean, pred = cost.memory_plan(big_merge)
    assert lean == {1} and pred["predicted"] > pred["original"]  # a merge matrix twice the weight: counted
    lean, pred = cost.memory_plan([(8 << 20, 49, "fixed", 8 << 20), (1 << 20, 196, "dense", 1 << 20)])
    assert lean == {1} and pred["predicted"] > pred["original"]  # the user's dense layer stays, as close as it gets


def test_default_session_needs_no_more_memory_than_the_original(wide):
    x = feeds(wide)
    auto = onnxstack.compress(wide)
    speed = onnxstack.compress(wide, onnxstack.CompressConfig(execution="speed"))
    guard = auto.report["memory_guard"]
    assert guard["lean"] and "memory_guard" not in speed.report
    assert {e["name"] for e in auto.report["layers"] if e.get("execution") == "lean"} == set(guard["lean"])
    assert all(e.get("execution") != "lean" for e in speed.report["layers"])
    original = session_memory(wide, x)
    assert session_memory(auto.model, x) <= original < session_memory(speed.model, x), \
        (session_memory(auto.model, x) / MB, original / MB)
    a, b = run_ort(auto.model, x)[0], run_ort(speed.model, x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # the same fit, run another way
