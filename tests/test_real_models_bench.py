"""The pure helpers of bench/real_models.py (metrics, data split, table) on synthetic arrays: no network, no weights."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_models as rm  # noqa: E402


def test_calibration_and_evaluation_photos_are_disjoint():
    assert not set(rm.CALIB_PHOTOS) & set(rm.EVAL_PHOTOS)
    # a stereo pair is one scene: both halves sit on the same side
    assert {"motorcycle_left.png", "motorcycle_right.png"} <= set(rm.CALIB_PHOTOS)


def test_agreement_and_top1():
    ref = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    out = np.array([[1.0, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    assert rm.agreement(ref, out) == 0.5
    assert rm.agreement(ref, ref) == 1.0
    assert rm.top1(out, np.array([0, 2, 2, 2])) == 0.75


def test_psnr():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 1, 8, 8))
    assert rm.psnr(ref, ref) == 100.0
    out = ref + 0.1  # mse 0.01 -> 20 dB
    assert rm.psnr(ref, out) == pytest.approx(20.0)
    assert rm.psnr(ref, ref + 0.01) > rm.psnr(ref, ref + 0.1)


def test_edge_fscore():
    ref = np.zeros((1, 1, 4, 4))
    ref[0, 0, 0] = 1  # 4 edge pixels
    assert rm.edge_fscore(ref, ref) == 1.0
    assert rm.edge_fscore(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    out = np.zeros_like(ref)
    out[0, 0, 0, :2] = 0.9  # 2 of 4 found, none extra: P = 1, R = 0.5
    assert rm.edge_fscore(ref, out) == pytest.approx(2 / 3)
    assert rm.edge_fscore(ref, np.zeros_like(ref)) == 0.0


def test_ctc_decode_and_string_match():
    assert rm.ctc_decode([0, 3, 3, 0, 3, 5, 5, 0]) == (3, 3, 5)
    assert rm.ctc_decode([]) == ()
    assert rm.string_match([(1,), (2, 3)], [(1,), (2,)]) == 0.5
    with pytest.raises(ValueError):
        rm.string_match([(1,)], [])


def test_iou_and_boxes_kept():
    a = np.array([[0, 0, 10, 10]], float)
    assert rm.iou(a, a)[0, 0] == pytest.approx(1.0)
    assert rm.iou(a, np.array([[5, 0, 15, 10]], float))[0, 0] == pytest.approx(50 / 150)
    ref = [[[0, 0, 10, 10], [20, 20, 30, 30]], []]
    assert rm.boxes_kept(ref, ref) == (1.0, 1.0)
    # one box found, one missed, one extra; a box is matched once only
    out = [[[0, 0, 10, 11], [1, 0, 10, 10]], [[50, 50, 60, 60]]]
    recall, precision = rm.boxes_kept(ref, out)
    assert recall == 0.5 and precision == pytest.approx(1 / 3)
    assert rm.boxes_kept([[]], [[]]) == (1.0, 1.0)


def test_yolox_boxes_decodes_one_confident_anchor():
    n = sum((416 // s) ** 2 for s in (8, 16, 32))
    out = np.full((1, n, 6), -10.0, np.float32)
    out[..., 4:] = 0.0
    out[0, 0] = [0.5, 0.5, np.log(2), np.log(2), 0.9, 0.9]  # centre (4, 4) at stride 8, 16 x 16
    boxes = rm.yolox_boxes(out)
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0], [-4, -4, 12, 12])


def test_methods_one_entry_a_row_and_missing_options_are_reported():
    labels = [m.label for m in rm.METHODS]
    assert len(labels) == len(set(labels))
    for r in rm.RATIOS:
        assert f"onnxstack calibrated, target {r}x" in labels
    fake = rm.Method("x", "onnxstack", calibrated=True, target=8, config={"no_such_option_xyz": True})
    assert "not yet available" in rm.available(fake)
    assert rm.available(rm.METHODS[0]) is None


def test_markdown_writes_errors_and_notes_as_rows():
    task = rm.tasks()["efficientnet_lite0"]
    info = {"title": "T", "conv_params": 10, "calibration_samples": 2, "input_shape": [3, 4, 4],
            "eval_samples": {"crops": 3}, "seconds": 60.0, "rows": [
                {"method": "fp32 original", "conv_ratio": 1.0, "file_ratio": 1.0, "crops_agreement": 1.0,
                 "foolbox_top1": 0.85, "primary_drop_points": 0.0, "seconds": None},
                {"method": "broken", "error": "ValueError: bad"},
                {"method": "later", "note": "not yet available"}]}
    md = rm.markdown({"efficientnet_lite0": info}, {"efficientnet_lite0": task})
    assert "| fp32 original | 1.0x | 1.00x | 85.0 | 100.0 | 0.0 |  |" in md
    assert "error: ValueError: bad" in md and "not yet available" in md
    assert rm.one_line(ValueError("a\nb|c")) == "ValueError: a b/c"


def test_rendered_text_streams_differ():
    if not Path("/usr/share/fonts/truetype/dejavu").exists():
        pytest.skip("no DejaVu fonts")
    x1, s1 = rm.rendered_text(20, seed=1)
    x2, s2 = rm.rendered_text(20, seed=2)
    assert x1.shape == (20, 1, 64, 192) and 0 <= x1.min() and x1.max() <= 1
    assert len(set(s1) & set(s2)) <= 1
    np.testing.assert_array_equal(rm.rendered_text(3, seed=1)[0], x1[:3])


def test_issue_bar():
    rows = [{"method": "onnxruntime int4 per-channel QDQ (weights)", "m": 0.90},
            {"method": "onnxstack calibrated, target 8x", "m": 0.91},
            {"method": "onnxstack calibrated, target 16x", "m": 0.86}]
    text = rm.issue_bar(rows, "m")
    assert "8x: 91.0 (calibrated) against 90.0 needed, met" in text
    assert "16x: 86.0 (calibrated) against 87.0 needed, not met" in text
    rebuilt = rows + [{"method": "onnxstack reconstructed, target 16x", "m": 0.88}]
    assert "16x: 88.0 (reconstructed) against 87.0 needed, met" in rm.issue_bar(rebuilt, "m")
    assert "16x: no result" in rm.issue_bar(rows[:2], "m")
    assert rm.issue_bar(rows[1:], "m") == ""


def test_allocation_summary_counts_each_representation():
    report = {"allocation": {"a": {"representation": "binary", "slice_dim": 4, "codebook_size": 256, "terms": 2,
                                   "bits": 100},
                             "b": {"representation": "int4", "bits": 40}, "c": {"representation": "binary"}},
              "reconstruction": {"ran": True, "kept": False, "held_out_output_error": {"closed_form": 1.0}}}
    got = rm.allocation_summary(report)
    assert got["layers_by_representation"] == {"binary": 2, "int4": 1}
    assert got["allocation"]["a"] == ["binary", 4, 256, 2, 100]
    assert got["reconstruction"]["kept"] is False
    assert rm.allocation_summary({"reconstruction": {"ran": False}}) == {}


def test_a_merged_rerun_replaces_its_rows_and_the_header_it_measured(tmp_path, monkeypatch):
    import json
    import types

    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    task = types.SimpleNamespace(metrics=[("m", "metric", True)], primary="m", caption="")
    head = {"title": "T", "input_shape": [1, 4, 4], "eval_samples": {"x": 5}, "conv_params": 10, "file_bytes": 100}
    old = {"runs": {"t": {"commit": "a" * 40, "date": "d"}},
           "results": {"t": {**head, "calibration_samples": 16, "partial": True, "rows": [
               {"method": "fp32 original", "conv_ratio": 1.0, "file_ratio": 1.0, "m": 1.0},
               {"method": "onnxstack calibrated, target 8x", "conv_ratio": 8.0, "file_ratio": 8.0, "m": 0.2}]}}}
    (tmp_path / "real_models.json").write_text(json.dumps(old))
    new = {**head, "calibration_samples": 64, "rows": [
        {"method": "fp32 original", "conv_ratio": 1.0, "file_ratio": 1.0, "m": 1.0},
        {"method": "onnxstack calibrated, target 8x", "conv_ratio": 8.0, "file_ratio": 8.0, "m": 0.3}]}
    args = types.SimpleNamespace(models=["t"], merge=True, only=["calibrated, target"])
    rm.write({"t": new}, {"t": task}, 1.0, args)
    got = json.loads((tmp_path / "real_models.json").read_text())["results"]["t"]
    assert got["calibration_samples"] == 64 and got["partial"] is True
    assert [r["m"] for r in got["rows"]] == [1.0, 0.3]
    assert "calibration 64 inputs" in (tmp_path / "real_models.md").read_text()
