"""onnxstack.data: .npz and image folders checked against the model, subsets, batches, preprocessing."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from onnxstack.data import Dataset, ImageOptions, from_arrays, load_data, model_inputs, select
from onnxstack.errors import ConfigError, DataError

try:
    from PIL import Image
except ImportError:
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow is not installed")


def parse(inputs: str, body: str = "out = Identity(x)", outputs: str = "float[N] out") -> onnx.ModelProto:
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
        g ({inputs}) => ({outputs}) {{ {body} }}""")
    onnx.checker.check_model(model)
    return model


GRAY = parse("float[batch, 1, 4, 4] x")  # NCHW, 1 channel, static 4x4
RGB = parse("float[batch, 3, 4, 4] x")
NHWC = parse("float[batch, 4, 4, 3] x")
ANY_HW = parse("float[batch, 3, h, w] x")
TWO = parse("float[batch, 3] a, int64[batch, 2] b", "out = Identity(a)")


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_image(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


# --- .npz -------------------------------------------------------------------------------------------


def test_npz_by_input_name_ignores_extra_arrays(tmp_path):
    a = np.arange(15, dtype=np.float64).reshape(5, 3)
    b = np.arange(10, dtype=np.int32).reshape(5, 2)
    ds = load_data(save_npz(tmp_path / "d.npz", a=a, b=b, extra=np.zeros(2)), TWO)
    assert len(ds) == 5 and ds.input_names == ["a", "b"] and ds.labels is None
    feeds, labels = ds.arrays()
    assert feeds["a"].dtype == np.float32 and feeds["b"].dtype == np.int64 and labels is None
    np.testing.assert_array_equal(feeds["a"], a.astype(np.float32))
    np.testing.assert_array_equal(feeds["b"], b)


def test_single_input_takes_any_name_and_labels(tmp_path, caplog):
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxstack"):
        ds = load_data(save_npz(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 2, 0, 1, 2], np.float32)),
                       GRAY)
    (record,) = caplog.records
    assert "the model's one input is 'x'; using the array 'images' (6, 1, 4, 4)" in record.getMessage()
    feeds, labels = ds.arrays()
    np.testing.assert_array_equal(feeds["x"], x)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.arrays(limit=4)[0]["x"].shape == (4, 1, 4, 4)


def test_model_path_and_symbolic_dims(tmp_path):
    onnx.save(ANY_HW, tmp_path / "m.onnx")
    ds = load_data(save_npz(tmp_path / "d.npz", x=np.zeros((2, 3, 7, 9), np.float32)), tmp_path / "m.onnx")
    assert ds.arrays()[0]["x"].shape == (2, 3, 7, 9)
    assert [(s.name, s.shape) for s in model_inputs(ANY_HW)] == [("x", ("batch", 3, "h", "w"))]


def test_limit_and_seed_pick_a_sorted_deterministic_subset(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1).repeat(4, 2).repeat(4, 3)
    path = save_npz(tmp_path / "d.npz", x=x, labels=np.arange(20))
    first = load_data(path, GRAY, limit=7, seed=3).labels
    assert len(first) == 7 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(load_data(path, GRAY, limit=7, seed=3).labels, first)
    assert not np.array_equal(load_data(path, GRAY, limit=7, seed=4).labels, first)
    feeds, labels = load_data(path, GRAY, limit=7, seed=3).arrays()
    np.testing.assert_array_equal(feeds["x"][:, 0, 0, 0], labels)  # samples stay with their labels
    assert len(load_data(path, GRAY, limit=20)) == 20 and len(load_data(path, GRAY, limit=99)) == 20
    np.testing.assert_array_equal(select(5, None, 0), np.arange(5))


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10, 64])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_sample_once(batch_size, shuffle):
    ds = from_arrays({"x": np.zeros((10, 1, 4, 4), np.float32), "labels": np.arange(10)}, GRAY)
    seen = []
    for feeds, labels in ds.batches(batch_size, shuffle=shuffle, seed=1):
        assert 1 <= len(labels) <= batch_size and feeds["x"].shape == (len(labels), 1, 4, 4)
        seen.extend(labels.tolist())
    assert sorted(seen) == list(range(10))
    if not shuffle:
        assert seen == list(range(10))


def test_batch_size_must_be_positive():
    ds = from_arrays({"x": np.zeros((2, 1, 4, 4), np.float32)}, GRAY)
    with pytest.raises(ConfigError, match="batch_size"):
        next(ds.batches(0))


# --- images -----------------------------------------------------------------------------------------


@needs_pillow
def test_flat_folder_gray_resized_to_model(tmp_path):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.PNG", np.full((8, 8), 50 * i))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = load_data(tmp_path / "imgs", GRAY)
    assert len(ds) == 3 and ds.labels is None and ds.classes is None
    x = ds.arrays()[0]["x"]
    assert x.shape == (3, 1, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([0, 50, 100]) / 255, rtol=1e-6)


@needs_pillow
def test_class_folders_give_sorted_label_ids(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3), ("emu", 1)):
        for i in range(n):
            write_image(tmp_path / "d" / cls / f"{i}.jpg", np.zeros((4, 4, 3)))
    ds = load_data(tmp_path / "d", RGB)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert [len(lab) for _, lab in ds.batches(4)] == [4, 2]
    assert load_data(tmp_path / "d", RGB, limit=3, seed=0).labels.tolist() == \
        load_data(tmp_path / "d", RGB, limit=3, seed=0).labels.tolist()


@needs_pillow
@pytest.mark.parametrize("model,channels,layout", [(RGB, "rgb", "nchw"), (RGB, "bgr", "nchw"), (NHWC, "auto", "nhwc")])
def test_channels_mean_std_layout(tmp_path, model, channels, layout):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 4, 3))
    write_image(tmp_path / "d" / "a.png", pixels)
    opts = ImageOptions(channels=channels, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), scale=1 / 255)
    x = load_data(tmp_path / "d", model, image_options=opts).arrays()[0]["x"][0]
    src = pixels[..., ::-1] if channels == "bgr" else pixels
    want = (src / 255 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])  # (H, W, C)
    np.testing.assert_allclose(x, want.transpose(2, 0, 1) if layout == "nchw" else want, rtol=1e-5, atol=1e-6)


@needs_pillow
def test_image_size_option_and_native_sizes(tmp_path):
    write_image(tmp_path / "d" / "a.png", np.full((5, 7, 3), 200))
    write_image(tmp_path / "d" / "b.png", np.full((6, 6, 3), 100))
    with pytest.raises(DataError, match=r"differ in size \(5x7 and 6x6\).*--image-size"):
        load_data(tmp_path / "d", ANY_HW).arrays()
    x = load_data(tmp_path / "d", ANY_HW, image_options=ImageOptions(size=(3, 2))).arrays()[0]["x"]
    assert x.shape == (2, 3, 3, 2)
    np.testing.assert_allclose(x[:, 0, 0, 0], [200 / 255, 100 / 255], rtol=1e-6)


def test_image_options_validation():
    for bad in (dict(size=(0, 4)), dict(size=(4,)), dict(channels="cmyk"), dict(layout="chw"),
                dict(scale=0), dict(std=(1.0, 0.0)), dict(mean=())):
        with pytest.raises(ConfigError):
            ImageOptions(**bad)
    assert ImageOptions(size=[2, 3], mean=0.5).mean == (0.5,)


# --- errors -----------------------------------------------------------------------------------------

ERRORS = [
    ("missing input", TWO, dict(a=np.zeros((2, 3)), c=np.zeros((2, 2))),
     r"no data for input 'b' \(batch, 2\); found 'a' \(2, 3\), 'c' \(2, 2\)"),
    ("wrong rank", GRAY, dict(x=np.zeros((10, 4, 4), np.float32)),
     r"input 'x' has shape \(10, 4, 4\), the model expects \(batch, 1, 4, 4\)"),
    ("static dim", GRAY, dict(x=np.zeros((10, 3, 4, 4), np.float32)),
     r"input 'x' has shape \(10, 3, 4, 4\), the model expects \(batch, 1, 4, 4\)"),
    ("integer pixels", GRAY, dict(x=np.zeros((2, 1, 4, 4), np.uint8)),
     r"input 'x' \(2, 1, 4, 4\) is uint8, the model expects float32; .*scale"),
    ("float for int", TWO, dict(a=np.zeros((2, 3)), b=np.zeros((2, 2))),
     r"input 'b' \(2, 2\) is float64, the model expects int64"),
    ("labels length", GRAY, dict(x=np.zeros((3, 1, 4, 4), np.float32), labels=np.arange(4)),
     r"labels have shape \(4,\), expected \(3,\)"),
    ("labels not integral", GRAY, dict(x=np.zeros((2, 1, 4, 4), np.float32), labels=np.array([0.5, 1.0])),
     r"labels \(2,\) must be integer class ids"),
    ("negative labels", GRAY, dict(x=np.zeros((2, 1, 4, 4), np.float32), labels=np.array([0, -1])), "negative"),
    ("empty", GRAY, dict(x=np.zeros((0, 1, 4, 4), np.float32)), "no samples"),
    ("sample counts", TWO, dict(a=np.zeros((2, 3)), b=np.zeros((3, 2), np.int64)),
     r"differ in sample count.*'a' \(2, 3\), 'b' \(3, 2\)"),
]


@pytest.mark.parametrize("case,model,arrays,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_npz_errors_name_input_and_shapes(tmp_path, case, model, arrays, message):
    with pytest.raises(DataError, match=message) as err:
        load_data(save_npz(tmp_path / "d.npz", **arrays), model)
    assert str(err.value).startswith(str(tmp_path / "d.npz")) and "\n" not in str(err.value)


def test_path_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(tmp_path / "missing.npz", GRAY)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="expected a .npz file or a folder of images"):
        load_data(tmp_path / "d.csv", GRAY)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="bad.npz: not a readable .npz file"):
        load_data(tmp_path / "bad.npz", GRAY)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_data(tmp_path / "one.npz", GRAY)
    with pytest.raises(ConfigError, match="limit"):
        load_data(tmp_path / "bad.npz", GRAY, limit=0)


@needs_pillow
def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(tmp_path / "empty", GRAY)
    write_image(tmp_path / "mixed" / "a.png", np.zeros((4, 4)))
    write_image(tmp_path / "mixed" / "cls" / "b.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"both images \(a.png\) and class sub-folders \(cls\)"):
        load_data(tmp_path / "mixed", GRAY)
    write_image(tmp_path / "ok" / "a.png", np.zeros((4, 4)))
    (tmp_path / "ok" / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"b.png: cannot decode image"):
        list(load_data(tmp_path / "ok", GRAY).batches(2))
    with pytest.raises(DataError, match=r"a folder of images feeds a model with one input; .*'a' \(batch, 3\)"):
        load_data(tmp_path / "ok", TWO)
    with pytest.raises(DataError, match=r"gray images have 1 channel\(s\), the model input 'x' expects \(batch, 3, 4"):
        load_data(tmp_path / "ok", RGB, image_options=ImageOptions(channels="gray"))
    with pytest.raises(DataError, match=r"image size 5x5 does not fit the model input 'x' \(batch, 1, 4, 4\)"):
        load_data(tmp_path / "ok", GRAY, image_options=ImageOptions(size=(5, 5)))
    with pytest.raises(ConfigError, match="mean has 2 values"):
        load_data(tmp_path / "ok", RGB, image_options=ImageOptions(mean=(0.1, 0.2)))
    with pytest.raises(DataError, match=r"model input 'out' expects \(batch, 3\)"):
        load_data(tmp_path / "ok", parse("float[batch, 3] out", "y = Identity(out)", "float[N] y"))


def test_missing_pillow_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="reading images needs Pillow; pip install pillow"):
        load_data(tmp_path / "imgs", GRAY)


def test_dataset_repr_and_len():
    ds = Dataset(["x"], 2, lambda i: {"x": np.zeros((len(i), 1))}, source="mem")
    assert len(ds) == 2 and "2 samples" in repr(ds) and ds.arrays()[1] is None


def test_cli_says_which_array_feeds_the_one_input(tmp_path):
    """compress prints the renaming as one warning line on stderr; an array named after the input says nothing."""
    from click.testing import CliRunner

    from cli import main

    from .models import conv_model

    onnx.save(conv_model([{"in": 16, "out": 32}, {"out": 16}]), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 16, 12, 12)).astype(np.float32)
    for name, expected in (("pixels", 1), ("input", 0)):
        np.savez(tmp_path / "d.npz", **{name: x})
        res = CliRunner().invoke(main, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-d", "8",
                                        "--data", str(tmp_path / "d.npz"), "-q", "--overwrite"])
        assert res.exit_code == 0, res.output
        lines = [line for line in res.stderr.splitlines() if "using the array" in line]
        assert len(lines) == expected, res.stderr
        if expected:
            assert lines[0].startswith("onnxstack: warning: ") and "'pixels' (8, 16, 12, 12)" in lines[0]



# --- a .npz read a batch at a time ------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
@pytest.mark.parametrize("limit", [None, 7])
def test_npz_read_lazily_equals_np_load(tmp_path, save, limit):
    from onnxstack.npzread import StoredArray, read_npz

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 3)), rng.integers(-5, 5, (20, 2)).astype(np.int32)
    save(tmp_path / "d.npz", a=a, b=b, labels=np.arange(20) % 3, extra=np.zeros(4))
    members = read_npz(tmp_path / "d.npz")
    assert all(isinstance(members[k], StoredArray) == (save is np.savez) for k in ("a", "b"))
    with np.load(tmp_path / "d.npz") as f:
        expect = from_arrays(dict(f), TWO, limit=limit, seed=2)
    ds = load_data(tmp_path / "d.npz", TWO, limit=limit, seed=2)
    assert len(ds) == len(expect) == (limit or 20)
    feeds, labels = ds.arrays()
    want, want_labels = expect.arrays()
    assert {k: v.dtype for k, v in feeds.items()} == {"a": np.float32, "b": np.int64}
    for k in ("a", "b"):
        np.testing.assert_array_equal(feeds[k], want[k])
        np.testing.assert_array_equal(ds.take([4, 0, 0, 3, 1])[k], want[k][[4, 0, 0, 3, 1]])  # any order, repeats
    np.testing.assert_array_equal(labels, want_labels)
    for (f1, l1), (f2, l2) in zip(ds.batches(3, shuffle=True, seed=5), expect.batches(3, shuffle=True, seed=5)):
        np.testing.assert_array_equal(f1["a"], f2["a"])
        np.testing.assert_array_equal(l1, l2)


def test_stored_rows_read_runs_of_the_file(tmp_path):
    from onnxstack.npzread import read_npz

    x = np.arange(2 * 5 * 3, dtype=">f8").reshape(10, 3)  # big-endian, as np.load would give it
    np.savez(tmp_path / "d.npz", x=x, scalar=np.float32(1), text=np.array(["a", "b"]))
    m = read_npz(tmp_path / "d.npz")
    idx = np.array([9, 2, 3, 4, 0, 8, 8])
    got = m["x"].rows(idx)
    assert got.dtype == x.dtype and m["x"].shape == (10, 3) and m["x"].ndim == 2
    np.testing.assert_array_equal(got, x[idx])
    np.testing.assert_array_equal(m["x"].load(), x)
    assert m["x"].rows(np.arange(0)).shape == (0, 3)
    assert isinstance(m["scalar"], np.ndarray) and m["text"].shape == (2,)  # 0-d: loaded whole


def test_stored_npz_checks_from_the_header_and_values_only_where_a_cast_overflows(tmp_path):
    small = parse("int8[batch, 2] b", "out = Identity(b)", "int8[N, 2] out")
    path = save_npz(tmp_path / "d.npz", b=np.array([[1, 2], [3, 300]], np.int16))
    with pytest.raises(DataError, match=r"d.npz: data for input 'b' \(2, 2\) has values outside int8"):
        load_data(path, small)
    ds = load_data(save_npz(tmp_path / "e.npz", b=np.array([[1, 2], [3, -128]], np.int16)), small)
    assert ds.arrays()[0]["b"].dtype == np.int8 and ds.arrays()[0]["b"].tolist() == [[1, 2], [3, -128]]
    import io
    import zipfile

    npy = io.BytesIO()
    np.save(npy, np.zeros((50, 1, 4, 4), np.float32))
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as z:  # stored; its header says 50 samples, it holds 10
        z.writestr("x.npy", npy.getvalue()[: -40 * 16 * 4])
    with pytest.raises(DataError, match="t.npz: not a readable .npz file .member 'x.npy' is truncated") as err:
        load_data(tmp_path / "t.npz", GRAY)
    assert "\n" not in str(err.value)
