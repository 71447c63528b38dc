"""onnxstack.evaluate and `onnxstack evaluate`: metrics, per-layer SNR, sizes, latency, CLI errors."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnxstack
from cli.evaluate_cmd import evaluate as evaluate_cmd
from onnxstack.data import from_arrays
from onnxstack.errors import ConfigError, DataError
from onnxstack.evaluate import evaluate, format_evaluation

from .models import conv_model, run_ort

KEYS = {"accuracy_original", "accuracy_compressed", "top5_original", "top5_compressed", "top1_agreement",
        "output_max_abs", "output_rel_l2", "output_cosine", "layers", "original_bytes", "compressed_bytes",
        "file_ratio", "conv_ratio", "latency_ms_original", "latency_ms_compressed", "latency_ratio", "samples",
        "memory_bytes_original", "memory_bytes_compressed", "memory_ratio",
        "batch_size", "threads", "task", "psnr_db", "output_rel_mse", "mask_agreement", "pixel_class_agreement",
        "detections_original", "detections_compressed", "detections_kept", "detections_kept_same_anchor",
        "detections_extra", "det_threshold", "det_iou"}


def classifier(batch="batch", classes=10) -> onnx.ModelProto:
    """conv0 (3->8, left dense at d=4) -> conv1 -> conv2 (-> classes) -> GlobalAveragePool -> Flatten: (N, K)."""
    model = conv_model([{"in": 3, "out": 8}, {"out": 16, "pads": [1, 1, 1, 1]}, {"out": classes, "k": 1}], hw=(8, 8))
    graph = model.graph
    graph.node[-1].output[0] = "features"
    graph.node.extend([helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool"),
                       helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten")])
    graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8]))
    del graph.value_info[:]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def models():
    original = classifier()
    return original, onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4)).model


@pytest.fixture(scope="module")
def data(models):
    x = np.random.default_rng(0).standard_normal((37, 3, 8, 8)).astype(np.float32)
    labels = run_ort(models[0], {"input": x})[0].argmax(1)
    labels[:5] = (labels[:5] + 1) % 10  # 32 of 37 right for the original
    return from_arrays({"input": x, "labels": labels}, models[0])


def python_types_only(value) -> bool:
    if isinstance(value, dict):
        return all(python_types_only(v) for v in value.values())
    if isinstance(value, list):
        return all(python_types_only(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def test_original_against_compressed(models, data):
    seen = []
    result = evaluate(*models, data, batch_size=16, latency_runs=2, progress=seen.append)
    assert set(result) == KEYS and python_types_only(result)
    assert result["task"] == "classify" and result["psnr_db"] is None and result["detections_kept"] is None
    assert seen == [16, 16, 5] and result["samples"] == 37 and result["batch_size"] == 16
    assert result["accuracy_original"] == pytest.approx(32 / 37)
    for key in ("accuracy_compressed", "top5_original", "top5_compressed", "top1_agreement", "output_cosine"):
        assert 0 <= result[key] <= 1, key
    assert result["top5_original"] >= result["accuracy_original"]
    assert result["output_rel_l2"] > 0 and result["output_max_abs"] > 0
    assert [e["name"] for e in result["layers"]] == ["conv1", "conv2"]
    assert [e["output"] for e in result["layers"]] == ["c1", "c2"]
    assert all(math.isfinite(e["snr_db"]) for e in result["layers"])
    assert result["compressed_bytes"] == models[1].ByteSize() and result["file_ratio"] > 0
    assert result["latency_ms_original"] > 0 and result["latency_ratio"] > 0
    assert result["memory_bytes_original"] > 0 and result["memory_bytes_compressed"] > 0
    assert result["memory_ratio"] == pytest.approx(result["memory_bytes_compressed"] / result["memory_bytes_original"])
    stored = json.loads({p.key: p.value for p in models[1].metadata_props}["onnxstack.report"])
    assert result["conv_ratio"] == pytest.approx(stored["conv_bits_original"] / stored["conv_bits_compressed"])
    assert result["conv_ratio"] > 4  # d=4 and up on these layers
    text = format_evaluation(result)
    assert "top-1 accuracy" in text and "compressed" in text and "conv2" in text and "session memory (MB)" in text


def test_snr_matches_a_direct_computation(models, data):
    layer_out = onnx.ModelProto()
    layer_out.CopyFrom(models[0])
    layer_out.graph.output.append(helper.make_empty_tensor_value_info("c1"))
    compressed_out = onnx.ModelProto()
    compressed_out.CopyFrom(models[1])
    compressed_out.graph.output.append(helper.make_empty_tensor_value_info("c1"))
    x = data.arrays()[0]
    ref, out = run_ort(layer_out, x)[1].astype(np.float64), run_ort(compressed_out, x)[1].astype(np.float64)
    want = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    result = evaluate(*models, data, batch_size=10, latency_runs=0, memory=False)
    assert result["layers"][0]["snr_db"] == pytest.approx(want, rel=1e-6)
    assert result["latency_ms_original"] is None and result["latency_ratio"] is None
    assert result["memory_bytes_original"] is None and result["memory_ratio"] is None


def test_model_against_itself(models, data):
    result = evaluate(models[1], models[1], data, latency_runs=1)
    assert result["top1_agreement"] == 1.0 and result["output_rel_l2"] == 0.0 and result["output_max_abs"] == 0.0
    assert result["output_cosine"] == pytest.approx(1.0)
    assert result["accuracy_original"] == result["accuracy_compressed"]
    assert len(result["layers"]) == 2 and all(e["snr_db"] == math.inf for e in result["layers"])


def test_one_model_alone(models, data):
    result = evaluate(models[0], data=data, latency_runs=1)
    assert set(result) == KEYS and result["layers"] == []
    assert result["accuracy_original"] == pytest.approx(32 / 37)
    for key in ("accuracy_compressed", "top1_agreement", "output_rel_l2", "compressed_bytes", "latency_ratio"):
        assert result[key] is None, key
    assert "compressed" not in format_evaluation(result)


def test_unlabelled_data_and_few_classes():
    model = classifier(classes=4)
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    result = evaluate(model, model, from_arrays({"input": x}, model), latency_runs=0)
    assert result["accuracy_original"] is None and result["top5_original"] is None
    assert result["top1_agreement"] == 1.0
    with pytest.raises(DataError, match=r"labels go up to 7, but the model's first output \(6, 4\) has 4 classes"):
        evaluate(model, data=from_arrays({"input": x, "labels": np.arange(6) + 2}, model), latency_runs=0)


def test_static_batch_dim_pads_the_last_batch():
    model = classifier(batch=4)
    x = np.random.default_rng(2).standard_normal((10, 3, 8, 8)).astype(np.float32)
    seen = []
    result = evaluate(model, model, from_arrays({"input": x, "labels": np.zeros(10)}, model), batch_size=64,
                      latency_runs=1, progress=seen.append)
    assert seen == [4, 4, 2] and result["samples"] == 10 and result["batch_size"] == 4


def test_option_errors(models, data):
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(models[0], data=data, batch_size=0)
    with pytest.raises(ConfigError, match="threads"):
        evaluate(models[0], data=data, threads=0)
    with pytest.raises(TypeError, match="data="):
        evaluate(models[0], models[1])


# --- CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, models, data):
    onnx.save(models[0], tmp_path / "m.onnx")
    onnx.save(models[1], tmp_path / "m.stacked.onnx")
    feeds, labels = data.arrays()
    np.savez(tmp_path / "val.npz", input=feeds["input"], labels=labels)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(evaluate_cmd, [str(a) for a in args])


def test_cli_writes_json(files):
    out = files / "eval.json"
    result = invoke(files / "m.onnx", files / "m.stacked.onnx", "--data", files / "val.npz", "--json", out,
                    "--batch-size", 8, "--limit", 20, "--latency-runs", 1, "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    report = json.loads(out.read_text())
    (line,) = result.stdout.splitlines()  # -q: one summary line, percent and points
    drop = 100 * (report["accuracy_original"] - report["accuracy_compressed"])
    assert line.startswith(f"top-1 original {100 * report['accuracy_original']:.2f}%, compressed ")
    assert f"(drop {drop:.2f} points)" in line and "20 samples" in line
    quiet = invoke(files / "m.onnx", files / "m.stacked.onnx", "--data", files / "val.npz", "--limit", 20,
                   "--latency-runs", 0, "-q")
    assert quiet.exit_code == 0 and len(quiet.stdout.splitlines()) == 1 and "top-1 agreement" in quiet.stdout
    assert set(report) == KEYS and report["samples"] == 20
    assert report["original_bytes"] == (files / "m.onnx").stat().st_size
    again = invoke(files / "m.onnx", "--data", files / "val.npz", "--json", out, "--latency-runs", 0)
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.stderr
    again = invoke(files / "m.onnx", "--data", files / "val.npz", "--json", out, "--latency-runs", 0, "--overwrite")
    assert again.exit_code == 0 and "top-1 accuracy" in again.stdout and f"wrote {out}" in again.stdout
    assert json.loads(out.read_text())["compressed_bytes"] is None


def test_cli_image_folder(files):
    Image = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        (files / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 12), (40 * i, 100, 200)).save(files / "imgs" / cls / f"{i}.png")
    result = invoke(files / "m.onnx", files / "m.stacked.onnx", "--data", files / "imgs", "--mean", "0.5,0.5,0.5",
                    "--std", "0.25", "--latency-runs", 0)
    assert result.exit_code == 0, result.output
    assert "6 samples" in result.stdout and "conv1" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--data", "{d}/nothing.npz"], "nothing.npz: no such file or folder"),
    (["--data", "{d}/wrong.npz"], r"data for input 'input' has shape (5, 8, 8), the model expects (batch, 3, 8, 8)"),
    (["{d}/val.npz", "--data", "{d}/val.npz"], "val.npz: not an ONNX model"),
    (["--data", "{d}/val.npz", "--image-size", "0", "4"], "image size must be two positive integers"),
])
def test_cli_errors_are_one_line(files, args, message):
    np.savez(files / "wrong.npz", x=np.zeros((5, 8, 8), np.float32))
    result = invoke(files / "m.onnx", *[a.format(d=files) for a in args])
    assert result.exit_code == 1
    assert result.stderr.startswith("onnxstack: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("args,message", [(["--mean", "a,b"], "comma-separated numbers"),
                                          (["--threads", "0"], "0 is not in the range x>=1")])
def test_cli_usage_errors_exit_2(files, args, message):
    result = invoke(files / "m.onnx", "--data", files / "val.npz", *args)
    assert result.exit_code == 2 and message in result.stderr
