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
    (["-d", "0"], 2, "-d/--slice-dim must be an integer in [1, 4096], got 0"),
    (["-m", "1"], 2, "-m/--codebook-size must be an integer in [2, 65536], got 1"),
    (["--max-codebook-size", "1"], 2, "--max-codebook-size must be"),
    (["-k", "9"], 2, "-k/--terms must be an integer in [1, 4], got 9"),
    (["--iterations", "5000"], 2, "--iterations must be in [0, 1000]"),
    (["--target-ratio", "0.5", "--data", "x.npz"], 2, "--target-ratio must be > 1, got 0.5"),
    (["--max-drop", "200", "--data", "x.npz"], 2, "--max-drop must be in [0, 100] points, got 200"),
    (["--target-ratio", "10", "--max-drop", "1", "--data", "x.npz"], 2, "give --target-ratio or --max-drop, not both"),
    (["--target-ratio", "10"], 2, "need calibration data: pass --data"),
    (["--finetune-epochs", "1"], 2, "needs training inputs: pass --data"),
    (["--augment", "2"], 2, "--augment stretches calibration data: pass --data"),
    (["--augment", "0", "--data", "x.npz"], 2, "0 is not in the range x>=1"),
    (["-m", "5000", "-d", "8"], 1, "exceeds the"),
    (["-d", "64"], 1, "no eligible Conv"),
    (["--bogus"], 2, "No such option"),
    (["--scale", "row"], 2, "Invalid value"),
])
def test_bad_options(model_path, tmp_path, args, code, pattern):
    result = run("compress", model_path, "-o", tmp_path / "o.onnx", *args)
    assert_one_line_error(result, code, pattern)
    import re

    assert not re.search(r"(?<![-/\w])(slice_dim|codebook_size|max_codebook_size|terms|iterations)(?![-\w])",
                         result.stderr) and "overwrite=True" not in result.stderr  # flags, not config fields
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_bad_slice_dim_is_a_usage_error(model_path):
    assert_one_line_error(run("inspect", model_path, "-d", "0"), 2, "-d/--slice-dim must be")


def test_existing_output_speaks_flags_in_the_cli_and_arguments_in_the_api(model_path, tmp_path):
    import onnxstack

    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    result = run("compress", model_path, "-o", out, "-d", "8")
    assert_one_line_error(result, 1, "exists; pass --overwrite to replace it")
    assert "overwrite=True" not in result.stderr
    with pytest.raises(onnxstack.OutputError, match="pass overwrite=True to replace it") as e:
        onnxstack.compress(model_path, onnxstack.CompressConfig(slice_dim=8)).save(out)
    assert "--overwrite" not in str(e.value)


def test_cli_modules_import_no_circle():
    """cli/app.py and the command modules share helpers through cli/common.py, not through each other."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "cli"
    graph = {}
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module)
        graph[path.stem] = deps

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    circles = sorted(m for m in graph if reaches(m, m))
    assert not circles, f"import circle through {circles}: {graph}"


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
    shown = json.loads(run("inspect", model_path, "--json").stdout)
    assert [r["eligible"] for r in shown["convs"]] == [True, True] and shown["compressed"] is None


def test_inspect_a_compressed_model(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert run("compress", model_path, "-o", out, "-d", "8", "--skip", "conv1", "--execution", "dense", "-q").exit_code == 0
    result = run("inspect", out)
    assert result.exit_code == 0, result.output
    assert "1 StackedBinaryConv layers (compressed by onnxstack" in result.stdout
    assert "conv0  dense" in result.stdout and "stored report (onnxstack.report): conv bits" in result.stdout
    assert "1 of 1 remaining Conv layers eligible" in result.stdout  # conv1 was left dense by --skip
    shown = json.loads(run("inspect", out, "--json").stdout)
    (layer,) = shown["compressed"]["layers"]
    assert layer["name"] == "conv0" and layer["slice_dim"] == 8 and layer["channels"] == 16
    assert shown["compressed"]["report"]["layers_compressed"] == 1 and shown["convs"][0]["name"] == "conv1"


def test_compressing_a_compressed_model_says_so(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert run("compress", model_path, "-o", out, "-d", "8", "-q").exit_code == 0
    assert_one_line_error(run("compress", out, "-o", tmp_path / "again.onnx", "-d", "8"), 1,
                          "already compressed by onnxstack")
    assert not (tmp_path / "again.onnx").exists()


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


def test_compress_with_augmented_data(model_path, tmp_path):
    import numpy as np

    data = tmp_path / "calib.npz"
    np.savez(data, input=np.abs(np.random.default_rng(0).standard_normal((6, 16, 12, 12))).astype(np.float32))
    report = tmp_path / "r.json"
    result = run("compress", model_path, "-o", tmp_path / "o.onnx", "--data", data, "--augment", "3", "-d", "8",
                 "--report", report, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["calibrated"]


@pytest.mark.parametrize("args,pattern", [
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


@pytest.mark.parametrize("extra", [[], ["--inline-functions"], ["--external-data", "--skip", "conv1"]])
def test_report_and_table_give_the_written_file_size(model_path, tmp_path, extra):
    import os

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = run("compress", model_path, "-o", out, "-d", "8", "--report", rep, *extra)
    assert result.exit_code == 0, result.output
    size = os.path.getsize(out) + (os.path.getsize(f"{out}.data") if "--external-data" in extra else 0)
    report = json.loads(rep.read_text())
    assert report["compressed_bytes"] == size
    assert report["file_ratio"] == pytest.approx(report["original_bytes"] / size)
    file_row = next(line for line in result.stdout.splitlines() if line.startswith("file (bytes)"))
    assert file_row.split()[3] == str(size)
