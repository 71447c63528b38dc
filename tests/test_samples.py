"""The bundled sample models: default compression reaches the promised ratio, and the result runs in a
plain onnxruntime process that never imports onnxstack, matching the numpy reference."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from cli import main
from click.testing import CliRunner
from onnxstack import op

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "sample_models" / "fashion_cnn.onnx"
MNIST = REPO / "sample_models" / "mnist_cnn.onnx"


@pytest.fixture(scope="module")
def fashion_compressed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fashion")
    out, report = tmp / "OUT.onnx", tmp / "R.json"
    result = CliRunner().invoke(main, ["compress", str(FASHION), "-o", str(out), "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    return out, json.loads(report.read_text())


def test_fashion_default_ratio(fashion_compressed):
    out, report = fashion_compressed
    assert report["conv_ratio"] >= 30
    model = onnx.load(out)
    layers = [i for i in onnx.load(FASHION).graph.node if i.op_type in ("Conv", "Gemm")]
    eligible = {e["name"] for e in report["layers"] if "skipped" not in e}
    assert eligible and len(eligible) == len(layers) - 1  # only the 1-channel first conv stays dense
    assert {"fc1", "fc2"} <= eligible  # fully connected layers are compressed like 1x1 convs
    assert report["file_ratio"] >= 20  # the file shrinks with the layers (issue 14)
    assert all(n.domain == op.DOMAIN for n in model.graph.node if n.name in eligible)


def test_fashion_runs_in_plain_onnxruntime(fashion_compressed, tmp_path):
    out, _ = fashion_compressed
    x = np.load(REPO / "sample_models" / "data" / "fashion_test.npz")["input"][:64]
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{"input": np.load({str(tmp_path / 'x.npy')!r})}})[0]
        assert not any(m.startswith("onnxstack") for m in sys.modules)
        np.save({str(tmp_path / 'y.npy')!r}, y)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = np.load(tmp_path / "y.npy")
    ref = ReferenceEvaluator(onnx.load(out), new_ops=[op.StackedBinaryConvRef]).run(None, {"input": x})[0]
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4


@pytest.mark.parametrize("path", [MNIST, FASHION])
def test_sample_models_and_data_fit(path):
    from onnxstack.data import load_data

    short = path.stem.split("_")[0]
    for kind, n in (("test", 2000), ("calib", 1000)):
        data = load_data(REPO / "sample_models" / "data" / f"{short}_{kind}.npz", onnx.load(path))
        assert len(data) == n and data.labels is not None
