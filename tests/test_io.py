"""io.py: what the writers leave on disk (modes that follow the umask)."""

import os
import stat

import onnx
import pytest
from click.testing import CliRunner

import onnxstack
from cli import main

from .models import conv_model


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 64}, {"out": 16}]), src)
    umask(mask)
    expected = 0o666 & ~mask
    res = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "o.onnx"), "-d", "8", "-q",
                                    "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert mode(tmp_path / "o.onnx") == expected and mode(tmp_path / "r.json") == expected
    result = onnxstack.compress(src, onnxstack.CompressConfig(slice_dim=8, skip=("conv1",)))  # a large tensor
    result.save(tmp_path / "api.onnx")
    result.save(tmp_path / "ext.onnx", external_data=True)
    for name in ("api.onnx", "ext.onnx", "ext.onnx.data"):
        assert mode(tmp_path / name) == expected, name
