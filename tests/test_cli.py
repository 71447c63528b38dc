import json
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from cli import main

from .models import conv_model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 16}]), path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code, pattern):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert pattern in lines[0], lines[0]


def test_compress_defaults(model_path, tmp_path):
    before = model_path.read_bytes()
    result = run("compress", model_path, "-d", "8", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "net.stacked.onnx"
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("original_bytes", "compressed_bytes", "file_ratio", "conv_bits_original", "conv_bits_compressed",
                "conv_ratio", "layers"):
        assert key in report
    assert {"name", "shape", "slice_dim", "codebook_size", "execution", "bits", "ratio", "weight_rel_error"} <= set(report["layers"][0])
    assert "total (convs)" in result.stdout and "conv0" in result.stdout
    assert model_path.read_bytes() == before


def test_compress_options_and_quiet(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    result = run("compress", model_path, "-o", out, "-d", "4", "-m", "8", "--scale", "filter", "--execution",
                 "stacked", "--skip", "conv1", "--seed", "2", "-q")
    assert result.exit_code == 0 and result.stdout == ""
    nodes = onnx.load(out).graph.node
    assert [n.op_type for n in nodes if n.name.startswith("conv")] == ["StackedBinaryConv", "Conv"]
    assert nodes[0].overload == "stacked"


def test_existing_output_is_kept(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    assert_one_line_error(run("compress", model_path, "-o", out, "-d", "8"), 1, "exists; pass --overwrite")
    assert out.read_bytes() == b"keep me"
    assert run("compress", model_path, "-o", out, "-d", "8", "--overwrite", "-q").exit_code == 0
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("args,code,pattern", [
    (["-d", "0"], 1, "slice_dim must be"),
    (["-m", "1"], 1, "codebook_size must be"),
    (["-m", "5000", "-d", "8"], 1, "exceeds the"),
    (["-d", "64"], 1, "no eligible Conv"),
    (["--bogus"], 2, "No such option"),
    (["--scale", "row"], 2, "Invalid value"),
])
def test_bad_options(model_path, tmp_path, args, code, pattern):
    assert_one_line_error(run("compress", model_path, "-o", tmp_path / "o.onnx", *args), code, pattern)
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input(model_path):
    before = model_path.read_bytes()
    assert_one_line_error(run("compress", model_path, "-o", model_path, "--overwrite"), 1, "output is the input")
    assert model_path.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"hello, not a model", b"\x08\x07\x12\x03abc\xff\xff"])
def test_not_onnx(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    assert_one_line_error(run("compress", bad), 1, "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated(model_path, tmp_path, fraction):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert_one_line_error(run("compress", cut, "-d", "8"), 1, "cut.onnx")
    assert not (tmp_path / "cut.stacked.onnx").exists()


def test_missing_file(tmp_path):
    assert_one_line_error(run("compress", tmp_path / "nope.onnx"), 1, "no such file")


def test_inspect(model_path):
    result = run("inspect", model_path, "-d", "32")
    assert result.exit_code == 0
    assert "skipped: 16 input channels, fewer than slice depth d=32" in result.stdout
    assert "1 of 2 Conv layers eligible" in result.stdout
    rows = json.loads(run("inspect", model_path, "--json").stdout)
    assert [r["eligible"] for r in rows] == [True, True]


def test_python_dash_m(model_path):
    out = subprocess.run([sys.executable, "-m", "onnxstack", "inspect", str(model_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "conv0" in out.stdout
    out = subprocess.run([sys.executable, "-m", "onnxstack", "compress", str(model_path.with_name("x.onnx"))],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_compress_with_data_and_target(model_path, tmp_path):
    import numpy as np

    data = tmp_path / "calib.npz"
    np.savez(data, input=np.abs(np.random.default_rng(0).standard_normal((40, 16, 12, 12))).astype(np.float32))
    report = tmp_path / "r.json"
    result = run("compress", model_path, "-o", tmp_path / "o.onnx", "--data", data, "--target-ratio", "10",
                 "--report", report, "-q")
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert r["calibrated"] and r["conv_ratio"] >= 10 and set(r["allocation"]) == {"conv0", "conv1"}


@pytest.mark.parametrize("args,pattern", [
    (["--target-ratio", "10"], "need calibration data"),
    (["--data", "missing.npz"], "missing.npz"),
])
def test_data_errors(model_path, tmp_path, args, pattern):
    assert_one_line_error(run("compress", model_path, "-o", tmp_path / "o.onnx", *args), 1, pattern)
    assert not (tmp_path / "o.onnx").exists()


def test_wrong_data_shape(model_path, tmp_path):
    import numpy as np

    data = tmp_path / "bad.npz"
    np.savez(data, input=np.zeros((4, 3, 12, 12), np.float32))
    assert_one_line_error(run("compress", model_path, "-o", tmp_path / "o.onnx", "--data", data), 1, "input 'input'")
