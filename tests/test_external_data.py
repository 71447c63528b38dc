"""Models with external data: read safely (relative locations inside the model's folder only), written
with external data when the input had it or past 2 GB, small tensors inline, byte-identical reruns."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxstack
from onnxstack import CompressConfig, ModelError, OutputError, io, load

from .models import conv_model, run_ort
from .test_cli import assert_one_line_error, run

CONFIG = CompressConfig(slice_dim=4, iterations=2)
X = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)


def model3():
    """A 3-channel stem (left dense: 1,728 bytes of weight) and two compressible layers."""
    return conv_model([{"in": 3, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 32, "pads": [1, 1, 1, 1]}, {"out": 16}])


def save_external(model, path, location="weights.bin", threshold=0):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=threshold)
    return path


def external_locations(model):
    return {t.name: {e.key: e.value for e in t.external_data}["location"]
            for t in load.all_tensors(model) if t.data_location == TensorProto.EXTERNAL}


def test_external_in_external_out(tmp_path):
    src = save_external(model3(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    assert run("compress", src, "-o", out, "-d", "4", "--iterations", "2", "-q").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "o.onnx.data", "weights.bin"]
    written = onnx.load(out, load_external_data=False)
    where = external_locations(written)
    assert where == {"conv0.weight": "o.onnx.data"}
    for tensor in load.all_tensors(written):  # small tensors (shapes, codes, scales) stay inline
        size = load.expected_bytes(tensor)
        assert (tensor.name in where) == (size is not None and size >= io.EXTERNAL_MIN_BYTES), tensor.name
    inline = onnxstack.compress(model3(), CONFIG).model
    onnx.checker.check_model(str(out), full_check=True)
    loaded, _ = load.load_model(out)
    assert loaded.SerializeToString() == inline.SerializeToString()  # the same model, only stored differently
    sess = onnxstack.open_session(out)
    np.testing.assert_allclose(sess.run(None, {"input": X})[0], run_ort(inline, {"input": X})[0], rtol=1e-6)


def test_no_external_data_option_and_auto_inline(tmp_path):
    src = save_external(model3(), tmp_path / "m.onnx")
    assert run("compress", src, "-o", tmp_path / "a.onnx", "--no-external-data", "-d", "4", "-q").exit_code == 0
    assert not external_locations(onnx.load(tmp_path / "a.onnx", load_external_data=False))
    plain = tmp_path / "plain.onnx"
    onnx.save(model3(), plain)
    assert run("compress", plain, "-o", tmp_path / "b.onnx", "-d", "4", "-q").exit_code == 0
    assert not (tmp_path / "b.onnx.data").exists()
    assert run("compress", plain, "-o", tmp_path / "c.onnx", "--external-data", "-d", "4", "-q").exit_code == 0
    assert external_locations(onnx.load(tmp_path / "c.onnx", load_external_data=False))


def test_external_data_when_over_the_protobuf_limit(tmp_path, monkeypatch):
    result = onnxstack.compress(model3(), CONFIG)
    size = result.model.ByteSize()
    monkeypatch.setattr(load, "PROTOBUF_LIMIT", size - 1)  # pretend the model is past 2 GB
    with pytest.raises(OutputError, match="over 2 GB and must be written with external data"):
        result.save(tmp_path / "x.onnx", external_data=False)
    out = result.save(tmp_path / "o.onnx")
    assert (tmp_path / "o.onnx.data").exists() and out.stat().st_size < size
    monkeypatch.undo()
    assert load.load_model(out)[0].SerializeToString() == result.model.SerializeToString()


def test_same_input_same_bytes_with_external_data(tmp_path):
    src = save_external(model3(), tmp_path / "m.onnx")
    for name in ("a.onnx", "b.onnx"):
        assert run("compress", src, "-o", tmp_path / name, "-d", "4", "--seed", "5", "-q").exit_code == 0
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    a, b = (tmp_path / "a.onnx").read_bytes(), (tmp_path / "b.onnx").read_bytes()
    assert a.replace(b"a.onnx.data", b"b.onnx.data") == b


def test_existing_data_file_is_kept(tmp_path):
    src = save_external(model3(), tmp_path / "m.onnx")
    (tmp_path / "o.onnx.data").write_bytes(b"keep me")
    assert_one_line_error(run("compress", src, "-o", tmp_path / "o.onnx", "-d", "4", "-q"), 1, "o.onnx.data: exists")
    assert (tmp_path / "o.onnx.data").read_bytes() == b"keep me" and not (tmp_path / "o.onnx").exists()
    assert run("compress", src, "-o", tmp_path / "o.onnx", "-d", "4", "--overwrite", "-q").exit_code == 0
    assert onnx.load(tmp_path / "o.onnx") is not None


def test_data_file_of_the_input_is_never_overwritten(tmp_path):
    src = save_external(model3(), tmp_path / "m.onnx", location="o.onnx.data")
    before = (tmp_path / "o.onnx.data").read_bytes()
    result = run("compress", src, "-o", tmp_path / "o.onnx", "-d", "4", "--overwrite", "-q")
    assert_one_line_error(result, 1, "a data file of the input model")
    assert (tmp_path / "o.onnx.data").read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_model_proto_with_unloaded_external_data_is_refused(tmp_path):
    path = save_external(model3(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="pass the model's path"):
        onnxstack.compress(onnx.load(path, load_external_data=False), CONFIG)


# --- locations that point outside the model's folder -----------------------------------------------


def _model_pointing_at(tmp_path, location, *, offset=None, length=None):
    """models/m.onnx whose conv0.weight lives at `location`; secret.bin outside models/ holds valid bytes."""
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    model = model3()
    weight = next(t for t in model.graph.initializer if t.name == "conv0.weight")
    raw = numpy_helper.to_array(weight).tobytes()
    (tmp_path / "secret.bin").write_bytes(raw)  # readable, valid data: reading it would succeed
    (folder / "inside.bin").write_bytes(raw)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            weight.external_data.add(key=key, value=str(value))
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location,pattern", [
    ("SECRET_ABS", "is an absolute path"),
    ("../secret.bin", "climbs out of the model's folder"),
    ("sub/../../secret.bin", "climbs out of the model's folder"),
    ("..\\secret.bin", "climbs out of the model's folder"),
    ("C:\\secret.bin", "is an absolute path"),
    ("link.bin", "resolves outside the model's folder"),
    ("linkdir/secret.bin", "resolves outside the model's folder"),
    ("missing.bin", "does not exist"),
    (".", "not a regular file"),
])
def test_unsafe_locations_are_refused(tmp_path, location, pattern):
    if location == "SECRET_ABS":
        location = str(tmp_path / "secret.bin")
    path = _model_pointing_at(tmp_path, location)
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    os.symlink(tmp_path, path.parent / "linkdir")
    assert_one_line_error(run("compress", path, "-d", "4"), 1, pattern)
    assert sorted(p.name for p in path.parent.iterdir()) == ["inside.bin", "link.bin", "linkdir", "m.onnx"]
    with pytest.raises(ModelError, match=pattern):
        onnxstack.inspect(path)


def test_symlink_inside_the_folder_is_fine(tmp_path):
    path = _model_pointing_at(tmp_path, "alias.bin")
    os.symlink(path.parent / "inside.bin", path.parent / "alias.bin")
    assert run("compress", path, "-d", "4", "-q").exit_code == 0


@pytest.mark.parametrize("offset,length,pattern", [
    (0, 10, "holds 10 bytes, but shape"),
    (100, None, "holds 1628 bytes, but shape"),
    (5000, None, "asks for bytes"),
    (0, 1 << 40, "asks for bytes"),
    ("x", None, "not integers"),
    (-4, None, "asks for bytes"),
])
def test_bad_offsets_and_lengths(tmp_path, offset, length, pattern):
    path = _model_pointing_at(tmp_path, "inside.bin", offset=offset, length=length)
    assert_one_line_error(run("compress", path, "-d", "4"), 1, pattern)


# --- over 2 GB -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_over_2gb(tmp_path):
    """A compressible conv next to a 2.1 GB constant: read from external data, compressed, written with
    external data (the output is past 2 GB too), small tensors inline, outputs as expected."""
    n = (2**31 + 2**26) // 4  # float32 elements: 2.1 GB
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        chunk = np.arange(1 << 24, dtype=np.float32) % 7
        for start in range(0, n, len(chunk)):
            f.write(chunk[: min(len(chunk), n - start)].tobytes())
    base = conv_model([{"in": 16, "out": 16, "pads": [1, 1, 1, 1]}])
    table = base.graph.initializer.add(name="table", data_type=TensorProto.FLOAT, dims=[n],
                                       data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * n))):
        table.external_data.add(key=key, value=value)
    picks = [0, 1, 5, 6, 7, n - 1]
    base.graph.initializer.append(numpy_helper.from_array(np.array(picks, np.int64), "picks"))
    base.graph.node.append(helper.make_node("Gather", ["table", "picks"], ["picked"], name="pick"))
    base.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, [len(picks)]))
    src = tmp_path / "m.onnx"
    src.write_bytes(base.SerializeToString())
    del base, table

    result = onnxstack.compress(src, CONFIG)
    assert result.report["layers_compressed"] == 1 and result.report["original_bytes"] > 2**31
    out = result.save(tmp_path / "o.onnx")
    del result
    written = onnx.load(out, load_external_data=False)
    assert external_locations(written) == {"table": "o.onnx.data"}
    assert out.stat().st_size < 1 << 20 and (tmp_path / "o.onnx.data").stat().st_size >= 4 * n
    sess = onnxstack.open_session(out)
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 12)).astype(np.float32)
    y, picked = sess.run(None, {"input": x})
    assert y.shape == (1, 16, 12, 12) and np.isfinite(y).all()
    assert picked.tolist() == [float(i % (1 << 24) % 7) for i in picks]
