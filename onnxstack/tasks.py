"""What users of a model read, by the kind of model: the evaluation metrics past classification (pure numpy).

The kind is told from the first output y of the original model (or chosen with `task`):

    classify  (B, K) or (B, K, 1, 1, ...) logits      top-1 / top-5, agreement (evaluate.py)
    detect    (B, A, 5+C) or (B, 5+C, A), A > 5+C     rows (cx, cy, w, h, objectness, C class probabilities)
    dense     anything else, e.g. (B, C, H, W)        image-to-image, segmentation, edge and depth maps

Dense, over all output values a (original) and b (compressed):

    psnr_db        10 log10(peak^2 / mean (a - b)^2),  peak = max(a) - min(a) over the data
    output_rel_mse sum (a - b)^2 / sum (a - mean(a))^2
    mask_agreement share of values where (a > 0.5) == (b > 0.5), when every a lies in [0, 1]
    pixel_class_agreement  share of pixels whose argmax over the channels agrees (rank 4, C > 1)

Detect: an anchor is a detection when objectness * class probability > threshold (its best class). Each
of the original's detections is kept when a detection of the compressed model of the same class overlaps
it with IoU >= DET_IOU (boxes matched within the image, no NMS on either side); `detections_kept_same_anchor`
asks the same anchor instead, and `detections_extra` is the share of the compressed model's detections
that match none of the original's.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

TASKS = ("auto", "classify", "dense", "detect")
DET_IOU = 0.5
DET_THRESHOLD = 0.5
_IOU_ROWS = 1024  # original detections matched at once

DENSE_KEYS = ("psnr_db", "output_rel_mse", "mask_agreement", "pixel_class_agreement")
DETECT_KEYS = ("detections_original", "detections_compressed", "detections_kept", "detections_kept_same_anchor",
               "detections_extra", "det_threshold", "det_iou")


def is_logits(y: np.ndarray) -> bool:
    return y.ndim >= 2 and all(d == 1 for d in y.shape[2:])


def detection_layout(y: np.ndarray) -> str | None:
    """"rows" for (B, A, 5+C), "columns" for (B, 5+C, A), None when the shape is neither."""
    if y.ndim != 3:
        return None
    a, b = y.shape[1:]
    if b >= 6 and a > b:
        return "rows"
    if a >= 6 and b > a:
        return "columns"
    return None


def resolve_task(task: str, y: np.ndarray) -> str:
    """The task for an original first output `y` (one batch): `task`, checked, or the one its shape tells."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "auto":
        if is_logits(y):
            return "classify"
        layout = detection_layout(y)
        return "detect" if layout and _scores_in_unit_range(_rows(y, layout)) else "dense"
    if task == "classify" and not is_logits(y):
        raise ConfigError(f"task 'classify' needs logits (N, K) or (N, K, 1, 1) as the first output; the "
                          f"original's is {y.shape}")
    if task == "detect":
        layout = detection_layout(y)
        if layout is None:
            raise ConfigError(f"task 'detect' needs a first output (N, anchors, 5+classes) or (N, 5+classes, "
                              f"anchors) with more anchors than columns; the original's is {y.shape}")
        if not _scores_in_unit_range(_rows(y, layout)):
            scores = _rows(y, layout)[..., 4:]
            raise ConfigError(f"task 'detect' reads objectness and class probabilities in [0, 1] (columns 4 on); "
                              f"the original's first output {y.shape} has scores in [{scores.min():.3g}, "
                              f"{scores.max():.3g}] (apply the sigmoid in the model)")
    return task


def _rows(y: np.ndarray, layout: str) -> np.ndarray:
    return y if layout == "rows" else y.transpose(0, 2, 1)


def _scores_in_unit_range(rows: np.ndarray) -> bool:
    scores = rows[..., 4:]
    return bool(scores.size) and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0


class DenseTotals:
    """Running float64 sums for the dense metrics."""

    def __init__(self) -> None:
        self.count = self.pixels = 0
        self.diff_sq = self.sum_a = self.sum_a2 = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.mask_agree = self.class_agree = 0

    def add(self, a: np.ndarray, b: np.ndarray | None) -> None:
        a = a.astype(np.float64)
        self.lo, self.hi = min(self.lo, float(a.min(initial=math.inf))), max(self.hi, float(a.max(initial=-math.inf)))
        self.count += a.size
        self.sum_a += float(a.sum())
        self.sum_a2 += float(np.sum(a * a))
        if b is None:
            return
        b = b.astype(np.float64)
        self.diff_sq += float(np.sum((a - b) ** 2))
        self.mask_agree += int(np.sum((a > 0.5) == (b > 0.5)))
        if a.ndim == 4 and a.shape[1] > 1:
            self.pixels += a.shape[0] * a.shape[2] * a.shape[3]
            self.class_agree += int(np.sum(a.argmax(1) == b.argmax(1)))

    def result(self, two: bool) -> dict:
        out = dict.fromkeys(DENSE_KEYS)
        if not two or not self.count:
            return out
        mse, peak = self.diff_sq / self.count, self.hi - self.lo
        spread = max(self.sum_a2 - self.sum_a ** 2 / self.count, 0.0)
        out["psnr_db"] = math.inf if mse == 0 else (10 * math.log10(peak ** 2 / mse) if peak > 0 else -math.inf)
        out["output_rel_mse"] = self.diff_sq / spread if spread > 0 else (0.0 if self.diff_sq == 0 else math.inf)
        if 0.0 <= self.lo and self.hi <= 1.0:
            out["mask_agreement"] = self.mask_agree / self.count
        if self.pixels:
            out["pixel_class_agreement"] = self.class_agree / self.pixels
        return out


class DetectTotals:
    """Running counts for the detection metrics at `threshold`."""

    def __init__(self, threshold: float = DET_THRESHOLD, iou: float = DET_IOU) -> None:
        self.threshold, self.iou = threshold, iou
        self.original = self.compressed = self.kept = self.kept_anchor = self.confirmed = 0

    def add(self, a: np.ndarray, b: np.ndarray | None) -> None:
        layout = detection_layout(a) or "rows"  # (B, A, 5+C) when A and 5+C cannot tell
        a = _rows(a, layout)
        cls_a, hit_a = self._detections(a)  # (B, A) best class, detection mask
        self.original += int(hit_a.sum())
        if b is None:
            return
        b = _rows(b, layout)
        cls_b, hit_b = self._detections(b)
        self.compressed += int(hit_b.sum())
        self.kept_anchor += int(np.sum(hit_a & hit_b & (cls_a == cls_b)))
        for i in range(len(a)):  # one image at a time: boxes are matched within an image
            ia, ib = np.flatnonzero(hit_a[i]), np.flatnonzero(hit_b[i])
            if not len(ia) or not len(ib):
                continue
            confirmed = np.zeros(len(ib), bool)
            for start in range(0, len(ia), _IOU_ROWS):
                rows = ia[start:start + _IOU_ROWS]
                same_class = cls_a[i, rows][:, None] == cls_b[i, ib][None, :]  # (rows, Pb)
                match = (box_iou(a[i, rows, :4], b[i, ib, :4]) >= self.iou) & same_class
                self.kept += int(match.any(1).sum())
                confirmed |= match.any(0)
            self.confirmed += int(confirmed.sum())

    def _detections(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = rows[..., 4:5].astype(np.float64) * rows[..., 5:]  # (B, A, C) objectness * class probability
        return scores.argmax(-1), scores.max(-1) > self.threshold

    def result(self, two: bool) -> dict:
        out = dict.fromkeys(DETECT_KEYS)
        out.update(detections_original=self.original, det_threshold=self.threshold, det_iou=self.iou)
        if two:
            out["detections_compressed"] = self.compressed
            if self.original:
                out["detections_kept"] = self.kept / self.original
                out["detections_kept_same_anchor"] = self.kept_anchor / self.original
            if self.compressed:
                out["detections_extra"] = 1 - self.confirmed / self.compressed
        return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Pa, Pb) IoU of boxes (cx, cy, w, h) a (Pa, 4) and b (Pb, 4)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lo_a, hi_a = a[:, None, :2] - a[:, None, 2:] / 2, a[:, None, :2] + a[:, None, 2:] / 2  # (Pa, 1, 2)
    lo_b, hi_b = b[None, :, :2] - b[None, :, 2:] / 2, b[None, :, :2] + b[None, :, 2:] / 2  # (1, Pb, 2)
    inter = np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None), axis=-1)
    area_a, area_b = np.prod(np.abs(a[:, 2:]), -1)[:, None], np.prod(np.abs(b[:, 2:]), -1)[None, :]
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def totals_for(task: str, det_threshold: float):
    """The running totals of a resolved task (None for classification, which evaluate.py sums itself)."""
    if task == "dense":
        return DenseTotals()
    if task == "detect":
        return DetectTotals(det_threshold)
    return None


def task_result(task: str, totals, two: bool) -> dict:
    """Every task key (None when it does not apply), so that the JSON has one shape."""
    out = {"task": task, **dict.fromkeys(DENSE_KEYS + DETECT_KEYS)}
    if totals is not None:
        out.update(totals.result(two))
    return out
