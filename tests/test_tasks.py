"""onnxstack.tasks and evaluate past classification: task detection, dense (PSNR) and detection metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxstack
from cli.evaluate_cmd import evaluate as evaluate_cmd
from onnxstack.data import from_arrays
from onnxstack.errors import ConfigError
from onnxstack.evaluate import evaluate, format_evaluation
from onnxstack.tasks import DetectTotals, box_iou, resolve_task

from .models import conv_model, run_ort


def head_model(out_ch, tail, *, shift=None, seed=0, hw=(8, 8)) -> onnx.ModelProto:
    """input (N, 3, H, W) -> Conv 3x3 (3 -> 8) -> Relu -> Conv 1x1 (8 -> out_ch) -> `tail` nodes -> output.
    shift: (channel, delta) added to the head's bias (a perturbed copy of the same model)."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w1 = (rng.standard_normal((out_ch, 8, 1, 1)) / 3).astype(np.float32)
    b1 = (rng.standard_normal(out_ch) * 0.3).astype(np.float32)
    if shift is not None:
        b1[shift[0]] += shift[1]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["head"], name="conv1"), *tail]
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(np.array([0, out_ch, -1], np.int64), "flat")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits)
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    onnx.checker.check_model(model, full_check=True)
    return model


def dense_model(**kw):
    """An image-to-image map: (N, 2, 8, 8) in [0, 1]."""
    return head_model(2, [helper.make_node("Sigmoid", ["head"], ["output"])], **kw)


def detector(columns=False, **kw):
    """A YOLO-style head: 64 anchors x (cx, cy, w, h, objectness, 2 class probabilities), all sigmoid."""
    tail = [helper.make_node("Sigmoid", ["head"], ["s"]), helper.make_node("Reshape", ["s", "flat"], ["cols"])]
    tail.append(helper.make_node("Identity" if columns else "Transpose", ["cols"], ["output"],
                                 **({} if columns else {"perm": [0, 2, 1]})))
    return head_model(7, tail, **kw)


def feeds(n=12, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return {"input": x}


def test_the_task_is_told_from_the_first_output():
    unit = np.random.default_rng(0).random
    assert resolve_task("auto", np.zeros((4, 10))) == "classify"
    assert resolve_task("auto", np.zeros((4, 10, 1, 1))) == "classify"
    assert resolve_task("auto", np.zeros((4, 3, 8, 8))) == "dense"
    assert resolve_task("auto", np.zeros((4, 1, 16, 16))) == "dense"
    assert resolve_task("auto", unit((4, 64, 7))) == "detect"
    assert resolve_task("auto", unit((4, 85, 300))) == "detect"
    assert resolve_task("auto", unit((4, 64, 7)) - 0.5) == "dense"  # raw scores: not probabilities
    assert resolve_task("auto", unit((4, 5, 5))) == "dense"
    assert resolve_task("dense", np.zeros((4, 10))) == "dense"
    with pytest.raises(ConfigError, match=r"task 'classify' needs logits .* the original's is \(4, 3, 8, 8\)"):
        resolve_task("classify", np.zeros((4, 3, 8, 8)))
    with pytest.raises(ConfigError, match=r"task 'detect' needs a first output"):
        resolve_task("detect", np.zeros((4, 3, 8, 8)))
    with pytest.raises(ConfigError, match=r"scores in \[-0\.5"):
        resolve_task("detect", np.full((4, 64, 7), -0.5))
    with pytest.raises(ConfigError, match="task must be one of auto, classify, dense, detect"):
        resolve_task("segment", np.zeros((4, 10)))


def test_dense_identical_models():
    model, x = dense_model(), feeds()
    result = evaluate(model, model, from_arrays(x, model), latency_runs=0)
    assert result["task"] == "dense" and result["accuracy_original"] is None and result["top1_agreement"] is None
    assert result["psnr_db"] == math.inf and result["output_rel_mse"] == 0.0
    assert result["mask_agreement"] == 1.0 and result["pixel_class_agreement"] == 1.0
    assert result["detections_kept"] is None
    text = format_evaluation(result)
    assert "PSNR (dB, peak = original's range)" in text and "inf" in text and "task dense" in text


def test_dense_metrics_of_a_perturbed_model():
    model, perturbed, x = dense_model(), dense_model(shift=(1, 0.4)), feeds()
    a, b = (run_ort(m, x)[0].astype(np.float64) for m in (model, perturbed))
    result = evaluate(model, perturbed, from_arrays(x, model), batch_size=5, latency_runs=0)
    mse = np.mean((a - b) ** 2)
    assert result["psnr_db"] == pytest.approx(10 * np.log10((a.max() - a.min()) ** 2 / mse), rel=1e-9)
    assert 10 < result["psnr_db"] < 40
    assert result["output_rel_mse"] == pytest.approx(np.sum((a - b) ** 2) / np.sum((a - a.mean()) ** 2), rel=1e-9)
    assert result["mask_agreement"] == pytest.approx(np.mean((a > 0.5) == (b > 0.5)))
    assert result["pixel_class_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert 0.5 < result["mask_agreement"] < 1 and result["pixel_class_agreement"] < 1
    text = format_evaluation(result)
    assert f"{100 * result['mask_agreement']:.2f}" in text and f"{result['psnr_db']:.2f}" in text


def test_dense_model_compressed_by_onnxstack():
    model = conv_model([{"in": 8, "out": 16, "pads": [1, 1, 1, 1]}, {"out": 4, "pads": [1, 1, 1, 1]}])
    compressed = onnxstack.compress(model, onnxstack.CompressConfig(slice_dim=4)).model
    x = np.abs(np.random.default_rng(2).standard_normal((8, 8, 12, 12))).astype(np.float32)
    result = evaluate(model, compressed, from_arrays({"input": x}, model), latency_runs=0)
    assert result["task"] == "dense" and math.isfinite(result["psnr_db"]) and result["output_rel_mse"] > 0
    assert result["mask_agreement"] is None  # Relu outputs: not a [0, 1] map
    assert [e["name"] for e in result["layers"]] == ["conv0", "conv1"]


def test_box_iou():
    a = np.array([[0.5, 0.5, 1.0, 1.0]])
    b = np.array([[0.5, 0.5, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0], [3.0, 3.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    assert np.allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0, 0.25]])


def test_detections_kept_on_a_known_case():
    #           cx   cy   w    h    obj  p0   p1
    original = [[0.2, 0.2, 0.2, 0.2, 0.9, 0.9, 0.1],   # kept at the same anchor
                [0.5, 0.5, 0.2, 0.2, 0.9, 0.9, 0.1],   # kept by the box at anchor 3 (IoU 0.67), not at its anchor
                [0.8, 0.8, 0.2, 0.2, 0.9, 0.1, 0.9],   # class 1 -> 0 in the compressed model: lost
                [0.2, 0.8, 0.2, 0.2, 0.9, 0.1, 0.9],   # no compressed detection near it: lost
                [0.9, 0.1, 0.2, 0.2, 0.3, 0.9, 0.1]]   # not a detection (0.27)
    compressed = [[0.2, 0.2, 0.2, 0.2, 0.9, 0.9, 0.1],
                  [0.5, 0.5, 0.2, 0.2, 0.1, 0.9, 0.1],   # below the threshold
                  [0.8, 0.8, 0.2, 0.2, 0.9, 0.9, 0.1],
                  [0.54, 0.5, 0.2, 0.2, 0.9, 0.9, 0.1],  # the moved box of original anchor 1
                  [0.9, 0.1, 0.2, 0.2, 0.9, 0.9, 0.1]]   # new: extra
    a, b = np.array([original], np.float32), np.array([compressed], np.float32)
    t = DetectTotals(0.5)
    t.add(a, b)
    r = t.result(True)
    assert (r["detections_original"], r["detections_compressed"]) == (4, 4)
    assert r["detections_kept"] == 0.5 and r["detections_kept_same_anchor"] == 0.25
    assert r["detections_extra"] == 0.5  # anchors 2 (class 0, no class-0 original there) and 4
    t = DetectTotals(0.2)
    t.add(a, a)
    assert t.result(True)["detections_kept"] == 1.0 and t.result(True)["detections_original"] == 5


@pytest.mark.parametrize("columns", [False, True])
def test_detector_against_itself_and_a_perturbed_copy(columns):
    model, x = detector(columns), feeds(16)
    data = from_arrays(x, model)
    same = evaluate(model, model, data, latency_runs=0)
    assert same["task"] == "detect" and same["detections_original"] > 10
    assert same["detections_kept"] == 1.0 and same["detections_kept_same_anchor"] == 1.0
    assert same["detections_extra"] == 0.0 and same["psnr_db"] is None and same["det_threshold"] == 0.5
    perturbed = detector(columns, shift=(4, -0.3))  # objectness lower: boxes and classes as they were
    result = evaluate(model, perturbed, data, latency_runs=0)
    a, b = (run_ort(m, x)[0] for m in (model, perturbed))
    if columns:
        a, b = a.transpose(0, 2, 1), b.transpose(0, 2, 1)
    sa, sb = a[..., 4:5] * a[..., 5:], b[..., 4:5] * b[..., 5:]
    hit_a, hit_b = sa.max(-1) > 0.5, sb.max(-1) > 0.5
    same_anchor = np.sum(hit_a & hit_b & (sa.argmax(-1) == sb.argmax(-1))) / hit_a.sum()
    assert result["detections_original"] == hit_a.sum() and result["detections_compressed"] == hit_b.sum()
    assert result["detections_kept_same_anchor"] == pytest.approx(same_anchor) and same_anchor < 0.95
    assert result["detections_kept"] == pytest.approx(same_anchor) and result["detections_extra"] == 0.0
    moved = evaluate(model, detector(columns, shift=(0, 0.3)), data, latency_runs=0)  # boxes moved right
    assert moved["detections_kept_same_anchor"] == 1.0 and moved["detections_kept"] < 0.5
    assert moved["detections_extra"] == pytest.approx(1 - moved["detections_kept"])
    text = format_evaluation(result)
    assert "detections kept % (IoU >= 0.5, same class)" in text and "same anchor" in text
    strict = evaluate(model, model, data, latency_runs=0, det_threshold=0.9)
    assert strict["detections_original"] < same["detections_original"] and strict["det_threshold"] == 0.9


def test_task_options_of_the_api():
    model = dense_model()
    data = from_arrays(feeds(4), model)
    with pytest.raises(ConfigError, match="task must be one of"):
        evaluate(model, data=data, task="boxes")
    with pytest.raises(ConfigError, match=r"det_threshold must be a number in \(0, 1\), got 1.5"):
        evaluate(model, data=data, det_threshold=1.5)
    with pytest.raises(ConfigError, match="task 'classify' needs logits"):
        evaluate(model, data=data, task="classify", latency_runs=0)
    alone = evaluate(model, data=data, latency_runs=0)
    assert alone["task"] == "dense" and alone["psnr_db"] is None


def invoke(*args):
    return CliRunner().invoke(evaluate_cmd, [str(a) for a in args])


def test_cli_task_and_threshold(tmp_path):
    for name, model in (("dense", dense_model()), ("perturbed", dense_model(shift=(0, 0.3))), ("det", detector())):
        onnx.save(model, tmp_path / f"{name}.onnx")
    np.savez(tmp_path / "x.npz", input=feeds(8)["input"])
    result = invoke(tmp_path / "dense.onnx", tmp_path / "perturbed.onnx", "--data", tmp_path / "x.npz",
                    "--latency-runs", 0, "-q", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "dense" and f"PSNR {report['psnr_db']:.2f} dB" in result.stdout
    result = invoke(tmp_path / "det.onnx", tmp_path / "det.onnx", "--data", tmp_path / "x.npz", "--latency-runs", 0,
                    "--det-threshold", "0.6", "-q")
    assert result.exit_code == 0 and "detections kept 100.00% (IoU >= 0.5, same class)" in result.stdout
    result = invoke(tmp_path / "dense.onnx", "--data", tmp_path / "x.npz", "--task", "classify", "--latency-runs", 0)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("onnxstack: error: task 'classify' needs logits")
    result = invoke(tmp_path / "dense.onnx", "--data", tmp_path / "x.npz", "--det-threshold", "1")
    assert result.exit_code == 2
