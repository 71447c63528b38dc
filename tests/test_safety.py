"""Bad input never gives a traceback, a hang, a partial file or a changed input; numbers that would
break a model are reported, not stored; reruns are byte-identical; a killed compress leaves no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxstack
from cli import main
from onnxstack import CompressConfig, NothingToCompressError, OnnxstackError, op

from .models import conv_model, run_ort

FAST = ["-d", "4", "--iterations", "2", "-m", "4", "-q"]


def base_models() -> dict[str, onnx.ModelProto]:
    m13 = conv_model([{"in": 8, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 8, "group": 2}], hw=(6, 6), opset=13,
                     ir_version=7)
    m17 = conv_model([{"in": 8, "out": 8, "strides": [2, 2]}, {"out": 8, "k": 1}], hw=(7, 7), seed=1)
    return {"m13": m13, "m17": m17}


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging."""
    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compress_cli(folder: Path, data: bytes, *extra: str, label: str = "") -> int:
    """Run `onnxstack compress` on `data` in-process and assert the safety contract; the exit code."""
    src, out = folder / "in.onnx", folder / "out.onnx"
    for p in folder.iterdir():
        p.unlink()
    src.write_bytes(data)
    with deadline(30):
        result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), *FAST, *extra])
    where = f"{label}: exit {result.exit_code}, stderr {result.stderr!r}"
    assert src.read_bytes() == data, where  # the input is untouched
    assert "Traceback" not in result.output, where
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], where
    if result.exit_code == 0:  # full check, lenient only on output shapes the input declared (as onnxruntime)
        onnxstack.load.check_model(onnx.load(out), full_check=True)
        assert result.stderr == "", where
        _runs_if_the_input_runs(data, out, where)
    else:
        assert result.exit_code in (1, 2), where + repr(result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxstack: error: "), where
        assert "internal error" not in lines[0], where
        assert sorted(p.name for p in folder.iterdir()) == ["in.onnx"], where  # nothing written
    return result.exit_code


def _runs_if_the_input_runs(data: bytes, out: Path, where: str) -> None:
    """Whatever onnxruntime runs before compression, it runs after (same output shapes)."""
    import onnxruntime as ort

    try:
        before_sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        feeds = onnxstack.api.random_inputs(onnx.load_from_string(data))
        before = before_sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - the damaged input does not run: nothing to compare
        return
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert [a.shape for a in after] == [b.shape for b in before], where


# --- mutations -------------------------------------------------------------------------------------


def byte_mutation(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "flip", "flip", "random", "splice", "zero"])
    b = bytearray(data)
    if kind == "truncate":
        return kind, bytes(b[: rng.integers(0, len(b))])
    if kind == "flip":
        for _ in range(rng.integers(1, 9)):
            k = int(rng.integers(len(b) * 8))
            b[k // 8] ^= 1 << (k % 8)
        return kind, bytes(b)
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(0, 2048)))
    if kind == "splice":
        at = int(rng.integers(len(b)))
        return kind, bytes(b[:at] + rng.bytes(int(rng.integers(1, 64))) + b[at:])
    at = int(rng.integers(len(b)))
    b[at: at + int(rng.integers(1, 32))] = bytes(min(32, len(b) - at))
    return kind, bytes(b)


def _weights(model):
    return [t for t in model.graph.initializer if t.name.endswith(".weight")]


def _set(tensor, array):
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))


def structural(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[str, onnx.ModelProto]:
    """A structurally wrong variant of `model` (the graph of conv_model: Conv, Relu, Conv, Relu)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    w = _weights(m)[int(rng.integers(len(_weights(m))))]
    arr = numpy_helper.to_array(w)
    kind = str(rng.choice(STRUCTURAL))
    if kind == "missing initializer":
        g.initializer.remove(next(t for t in g.initializer if t.name == w.name))
    elif kind == "weight rank 2":
        _set(w, arr.reshape(arr.shape[0], -1))
    elif kind == "weight rank 3":
        _set(w, arr.reshape(*arr.shape[:2], -1))
    elif kind == "weight rank 5":
        _set(w, arr[..., None])
    elif kind == "weight channels":
        _set(w, arr[:, : max(1, arr.shape[1] // 2)])
    elif kind == "bias length":
        b = next(t for t in g.initializer if t.name.endswith(".bias"))
        _set(b, np.zeros(int(rng.integers(1, 40)), np.float32))
    elif kind == "input channels":
        g.input[0].type.tensor_type.shape.dim[1].dim_value += int(rng.integers(1, 5))
    elif kind == "cycle":
        g.node[0].input[0] = g.node[-1].output[0]
    elif kind == "duplicate output":
        g.node[2].output[0] = g.node[0].output[0]
    elif kind == "duplicate initializer":
        g.initializer.add().CopyFrom(w)
    elif kind == "duplicate input":
        g.input.add().CopyFrom(g.input[0])
    elif kind == "dangling input":
        g.node[int(rng.integers(len(g.node)))].input[0] = "nowhere"
    elif kind == "weight type":
        _set(w, arr.astype(np.int64))
    elif kind == "nodes out of order":
        nodes = list(g.node)[::-1]
        del g.node[:]
        g.node.extend(nodes)
    elif kind == "zero stride":
        g.node[0].attribute.append(helper.make_attribute("strides", [0, 0]))
    elif kind == "kernel shape":
        g.node[0].attribute.append(helper.make_attribute("kernel_shape", [5, 5]))
    elif kind == "group":
        g.node[0].attribute[0].i = 3  # conv_model writes group first
    elif kind == "unknown op":
        g.node[1].op_type = "NoSuchOp"
    elif kind == "no opset":
        del m.opset_import[:]
    elif kind == "opset 99":
        m.opset_import[0].version = 99
    elif kind == "opset 1":
        m.opset_import[0].version = 1
    elif kind == "ir version":
        m.ir_version = int(rng.choice([0, 1, 99]))
    elif kind == "no outputs":
        del g.output[:]
    elif kind == "empty graph":
        del g.node[:]
    elif kind == "raw data size":
        w.raw_data = w.raw_data[: len(w.raw_data) // 2]
    elif kind == "negative dim":
        w.dims[0] = -w.dims[0]
    elif kind == "external data":
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=str(rng.choice(["../x.bin", "/etc/hostname", "nope.bin", ""])))
    return kind, m


STRUCTURAL = ["missing initializer", "weight rank 2", "weight rank 3", "weight rank 5", "weight channels",
              "bias length", "input channels", "cycle", "duplicate output", "duplicate initializer", "duplicate input",
              "dangling input", "weight type", "nodes out of order", "zero stride", "kernel shape", "group",
              "unknown op", "no opset", "opset 99", "opset 1", "ir version", "no outputs", "empty graph",
              "raw data size", "negative dim", "external data"]


def test_fuzz_hundreds_of_bad_files(tmp_path):
    """Seeded: byte-level damage of two small models and every kind of structural damage, several times."""
    rng = np.random.default_rng(20240607)
    bases = {k: m.SerializeToString() for k, m in base_models().items()}
    start, codes, n = time.monotonic(), {}, 0
    for i in range(600):
        name = list(bases)[i % 2]
        kind, data = byte_mutation(bases[name], rng)
        code = compress_cli(tmp_path, data, label=f"case {i} ({name}, {kind})")
        codes[code] = codes.get(code, 0) + 1
        n += 1
    for i in range(4 * len(STRUCTURAL)):
        name = list(bases)[i % 2]
        kind, model = structural(base_models()[name], rng)
        code = compress_cli(tmp_path, model.SerializeToString(), label=f"structural {i} ({name}, {kind})")
        codes[code] = codes.get(code, 0) + 1
        n += 1
    elapsed = time.monotonic() - start
    assert n >= 700 and codes.get(1, 0) > n // 2 and codes.get(0, 0) > 50, codes
    assert elapsed < 60, f"{n} cases took {elapsed:.0f} s"


@pytest.mark.parametrize("kind", STRUCTURAL)
def test_each_structural_error_is_one_clear_line(tmp_path, kind):
    rng = np.random.default_rng(0)
    model = base_models()["m17"]
    while True:
        got, bad = structural(model, rng)
        if got == kind:
            break
    assert compress_cli(tmp_path, bad.SerializeToString(), label=kind) == 1


# --- numbers that would silently break a model -----------------------------------------------------


def with_weight(fn, layers=None):
    model = conv_model(layers or [{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 16}])
    t = model.graph.initializer[0]
    _set(t, fn(numpy_helper.to_array(t).copy()).astype(np.float32))
    return model


def _nan(w):
    w[1, 2, 0, 0] = np.nan
    return w


def _inf(w):
    w[0, 0, 1, 1] = -np.inf
    return w


@pytest.mark.parametrize("fn,reason", [
    (_nan, "weight holds NaN or Inf"),
    (_inf, "weight holds NaN or Inf"),
    (lambda w: w * 0, "all weights are zero"),
    (lambda w: w * 1e-9, "weights too small for float16 scales"),
    (lambda w: w * 1e-7, "weights too small for float16 scales"),
    (lambda w: w * 1e7, "weights too large for float16 scales"),
])
def test_bad_numbers_are_skipped_with_the_reason(fn, reason):
    result = onnxstack.compress(with_weight(fn), CompressConfig(slice_dim=8))
    first, second = result.report["layers"]
    assert reason in first["skipped"] and "skipped" not in second
    onnx.checker.check_model(result.model, full_check=True)


def test_bias_nan_is_skipped():
    model = conv_model([{"in": 16, "out": 16}, {"out": 16}])
    _set(model.graph.initializer[1], np.full(16, np.nan, np.float32))
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert result.report["layers"][0]["skipped"] == "bias holds NaN or Inf"


def test_small_but_representable_weights_are_compressed():
    """1e-3 scales are normal float16 numbers: nothing is lost in storing them."""
    result = onnxstack.compress(with_weight(lambda w: w * 1e-2), CompressConfig(slice_dim=8))
    assert result.report["layers_compressed"] == 2


def test_zero_filters_stay_exactly_zero():
    def zero_some(w):
        w[[0, 5, 31]] = 0
        return w

    result = onnxstack.compress(with_weight(zero_some), CompressConfig(slice_dim=8))
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    w = op.decode_weight(*(inits[f"conv0.weight.{r}"] for r in ("codebook", "indices", "scales")), 16)
    assert np.all(w[[0, 5, 31]] == 0) and np.abs(w[1:5]).max() > 0


def test_only_bad_layers_gives_one_clear_error(tmp_path):
    model = with_weight(_nan, [{"in": 16, "out": 16}])
    with pytest.raises(NothingToCompressError, match="weight holds NaN or Inf"):
        onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert compress_cli(tmp_path, model.SerializeToString()) == 1


def test_non_finite_fit_is_refused_not_stored(monkeypatch):
    """Last line of defence: whatever the fit returns, NaN/Inf scales or bias never reach the file."""
    from onnxstack import fitters

    real = fitters.FITTERS["binary", "weights"]

    def broken(job):
        plan = real(job)
        plan.fit.scales[0, 0] = np.nan
        return plan

    monkeypatch.setitem(fitters.FITTERS, ("binary", "weights"), broken)
    with pytest.raises(OnnxstackError, match="layer 'conv0': 1 fitted scales value.* NaN or Inf.*--skip conv0"):
        onnxstack.compress(conv_model([{"in": 16, "out": 16}]), CompressConfig(slice_dim=8))


# --- same input, same bytes ------------------------------------------------------------------------


def test_same_input_options_and_seed_give_identical_files(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(stem_model(), src)
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32))
    runs = {}
    for name in ("a", "b"):
        for opts, tag in (([], "plain"), (["--data", str(data), "--limit", "16"], "calibrated"),
                          (["--inline-functions"], "inlined"), (["--external-data"], "external")):
            out = tmp_path / f"{name}-{tag}.onnx"
            result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "-d", "8", "--seed", "7", "-q",
                                               *opts])
            assert result.exit_code == 0, result.output
            runs[name, tag] = out.read_bytes()
    for tag in ("plain", "calibrated", "inlined", "external"):
        assert runs["a", tag] == runs["b", tag].replace(b"b-external", b"a-external"), tag
    assert (tmp_path / "a-external.onnx.data").read_bytes() == (tmp_path / "b-external.onnx.data").read_bytes()


# --- killed mid-write ------------------------------------------------------------------------------


def _spawn(src, out, *extra, delay=None):
    env = dict(os.environ)
    if delay is not None:
        env["ONNXSTACK_TEST_WRITE_DELAY"] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "onnxstack", "compress", str(src), "-o", str(out), "-d", "8", "-q",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parents[1])


def _wait_for(folder: Path, pattern: str, proc, timeout=60.0) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for found in sorted(folder.glob(pattern)):
            try:
                if found.stat().st_size > 0:
                    return found
            except FileNotFoundError:  # renamed meanwhile
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"{pattern} never appeared")


def stem_model():
    """A dense 3-channel stem (19 kB, left as it is with d=8, so written to external data) and two compressible convs."""
    return conv_model([{"in": 3, "out": 64, "k": 5, "pads": [2, 2, 2, 2]}, {"out": 32}, {"out": 16}])


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(stem_model(), src)
    return src


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "in.onnx")


@pytest.mark.parametrize("extra,phase", [([], "model"), (["--external-data"], "data"), (["--external-data"], "model")])
def test_kill_mid_write_leaves_no_output(source, extra, phase):
    folder, before = source.parent, source.read_bytes()
    out = folder / "out.onnx"
    proc = _spawn(source, out, *extra, delay=3.0 if phase == "model" and extra else 30)  # 3 s: past the data file
    temp = _wait_for(folder, ".out.onnx.data.*.tmp" if phase == "data" else ".out.onnx.[0-9]*.tmp", proc)
    proc.kill()
    proc.wait()
    assert source.read_bytes() == before
    assert not out.exists() and not (folder / "out.onnx.data").exists()
    left = _leftovers(folder)
    assert temp.name in left and all(n.startswith(".out.onnx.") and n.endswith(".tmp") for n in left), left
    # the next run to the same output finishes and removes what the killed one left
    rerun = _spawn(source, out, *extra)
    assert rerun.wait() == 0, rerun.communicate()
    assert _leftovers(folder) == (["out.onnx", "out.onnx.data"] if extra else ["out.onnx"])
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("after", [0.05, 0.4, 0.8, 1.5])
def test_kill_at_any_time_leaves_the_old_output_or_the_new_one(source, after):
    folder = source.parent
    out = folder / "out.onnx"
    out.write_bytes(b"previous output")
    proc = _spawn(source, out, "--overwrite")
    time.sleep(after)
    proc.kill()
    proc.wait()
    content = out.read_bytes()
    if content != b"previous output":
        onnx.checker.check_model(onnx.load_from_string(content), full_check=True)  # complete, never partial
    assert all(n == "out.onnx" or (n.startswith(".out.onnx.") and n.endswith(".tmp")) for n in _leftovers(folder))


def test_interrupt_mid_write_cleans_up(source):
    folder = source.parent
    proc = _spawn(source, folder / "out.onnx", delay=30)
    _wait_for(folder, ".out.onnx.*.tmp", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["onnxstack: error: interrupted; nothing was written"]
    assert _leftovers(folder) == []


def test_a_live_writers_temp_file_is_not_touched(source):
    """Stale-temp cleanup only removes files of processes that are gone."""
    folder = source.parent
    proc = _spawn(source, folder / "out.onnx", delay=30)
    temp = _wait_for(folder, ".out.onnx.*.tmp", proc)
    try:
        result = CliRunner().invoke(main, ["compress", str(source), "-o", str(folder / "other.onnx"), "-d", "8", "-q"])
        assert result.exit_code == 0
        onnxstack.io._remove_stale_temps(folder / "out.onnx")
        assert temp.exists()
    finally:
        proc.kill()
        proc.wait()


def test_report_of_bad_numbers_in_cli(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(with_weight(lambda w: w * 1e-9), src)
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "o.onnx"), "-d", "8",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0
    assert "too small for float16 scales" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert "too small for float16" in report["layers"][0]["skipped"]
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 12)).astype(np.float32)
    assert run_ort(onnx.load(tmp_path / "o.onnx"), {"input": x})[0].shape == (1, 16, 10, 10)
