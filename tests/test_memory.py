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
from onnxstack.runtime import session_memory

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
