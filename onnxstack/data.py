"""Evaluation, calibration and fine-tuning data: a .npz file or a folder of images, checked against the model.

    data = load_data("val.npz", model, limit=512)
    for feeds, labels in data.batches(64): ...
    feeds, labels = data.arrays(limit=128)           # all in memory (the settings search)

A .npz that np.savez wrote (members stored uncompressed) stays in the file: its shapes and dtypes are
checked from the .npy headers, and each batch reads just its rows (npzread.py), so memory holds a batch
whatever the number of samples. compressed npz: loaded whole (np.savez_compressed members are inflated
once, then sliced in memory).

Axis 0 of every array is the sample axis (it is not checked against the model's batch dim).
A .npz holds one array per model input, keyed by input name (a single-input model takes one array of
any other name, with a logged warning), and optional integer class ids under `labels`. An image folder is flat (no labels) or holds
one sub-folder per class (sorted names give ids 0..K-1). Images are decoded batch by batch:

    x = (pixel * scale - mean) / std      per channel, then laid out as the model input expects
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

import numpy as np
import onnx

from .errors import ConfigError, DataError
from .load import load_model
from .npzread import StoredArray, cast, check_labels, check_shape, sample_count, read_npz

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CHANNELS = ("auto", "gray", "rgb", "bgr")
LAYOUTS = ("auto", "nchw", "nhwc")
LABELS_KEY = "labels"

Dim = Union[int, str, None]  # static size, symbolic name, or unknown
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input.

    size: (H, W) to resize to (bilinear); None takes the model input's static H, W, else keeps each
        image's own size. channels: "auto" (1 model channel -> "gray", else "rgb"), "gray", "rgb", "bgr".
    scale, mean, std: x = (pixel * scale - mean) / std, one value or one per channel.
    layout: "auto" (channels-first unless only the last dim of the model input is 1 or 3), "nchw", "nhwc".
    """

    size: tuple[int, int] | None = None
    channels: str = "auto"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "auto"

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(_is_int(v) and v >= 1 for v in size):
                raise ConfigError(f"image size must be two positive integers (H, W), got {self.size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if self.channels not in CHANNELS:
            raise ConfigError(f"channels must be one of {CHANNELS}, got {self.channels!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not _is_number(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        if min(self.std) <= 0:
            raise ConfigError(f"std values must be > 0, got {self.std}")


@dataclass(frozen=True)
class InputSpec:
    """A graph input the caller must feed: name, numpy dtype, and dims (None when the rank is unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return "a tensor of any shape"
        dims = ["?" if d is None else str(d) for d in self.shape]
        return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


class Dataset:
    """Samples for a model's inputs (feeds keyed by input name) and optional int64 class labels."""

    def __init__(self, input_names: list[str], size: int, fetch: Callable[[np.ndarray], Feeds],
                 labels: np.ndarray | None = None, classes: list[str] | None = None, source: str = "",
                 original_size: int | None = None):
        self.input_names = list(input_names)
        self.original_size = size if original_size is None else original_size  # before augment(): the first ones
        self.labels = labels
        self.classes = classes  # class folder names, by label id, for image folders
        self.source = source
        self._size = size
        self._fetch = fetch  # sample indices -> feeds

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        labels = "labelled" if self.labels is not None else "unlabelled"
        return f"Dataset({self.source!r}, {self._size} samples, inputs {self.input_names}, {labels})"

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0
                ) -> Iterator[tuple[Feeds, np.ndarray | None]]:
        """(feeds, labels or None) of at most batch_size samples each, covering every sample once."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = np.random.default_rng(seed).permutation(self._size) if shuffle else np.arange(self._size)
        for start in range(0, self._size, batch_size):
            idx = order[start:start + batch_size]
            yield self._fetch(idx), (None if self.labels is None else self.labels[idx])

    def take(self, idx) -> Feeds:
        """The feeds of the samples idx (an integer array, any order), read or decoded now."""
        return self._fetch(np.asarray(idx, dtype=np.int64))

    def batch_for(self, max_bytes: int, most: int) -> int:
        """Samples a batch of at most `max_bytes` of feeds holds (1 to `most`), measured on one sample."""
        per_sample = sum(v.nbytes for v in self.take(np.arange(1)).values()) or 1
        return int(np.clip(max_bytes // per_sample, 1, most))

    def arrays(self, limit: int | None = None) -> tuple[Feeds, np.ndarray | None]:
        """The first `limit` samples (all when None) in memory, e.g. for calibration."""
        _check_limit(limit)
        idx = np.arange(self._size if limit is None else min(limit, self._size))
        return self._fetch(idx), (None if self.labels is None else self.labels[idx])


def load_data(path: str | os.PathLike, model, *, limit: int | None = None, seed: int = 0,
              image_options: ImageOptions | None = None) -> Dataset:
    """A .npz file or an image folder as a Dataset for `model` (ModelProto or path); `limit` picks a
    seeded random subset of that many samples, kept in file order."""
    _check_limit(limit)
    specs = model_inputs(_as_model(model))
    path = Path(path)
    if path.is_dir():
        return _image_folder(path, specs, image_options or ImageOptions(), limit, seed)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: expected a .npz file or a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = read_npz(path)  # uncompressed members stay in the file, read a batch at a time
    labels = arrays.get(LABELS_KEY)
    if isinstance(labels, StoredArray):
        labels = labels.load()
    return _dataset({k: v for k, v in arrays.items() if k != LABELS_KEY}, labels, specs, limit, seed, str(path))


def from_arrays(arrays: Mapping[str, np.ndarray], model, labels: np.ndarray | None = None, *,
                limit: int | None = None, seed: int = 0, source: str = "data") -> Dataset:
    """In-memory arrays (keyed by input name; `labels` may sit among them) checked against `model`
    (ModelProto, path, or its model_inputs()) and cast to the input dtypes."""
    _check_limit(limit)
    specs = model if isinstance(model, list) else model_inputs(_as_model(model))
    data = {k: np.asarray(v) for k, v in arrays.items() if k != LABELS_KEY}
    if labels is None and LABELS_KEY in arrays:
        labels = np.asarray(arrays[LABELS_KEY])
    return _dataset(data, labels, specs, limit, seed, source)


def _dataset(data: dict, labels, specs: list[InputSpec], limit: int | None, seed: int, source: str) -> Dataset:
    """Arrays in memory, or StoredArray members of a .npz (read a batch at a time, cast as they are read),
    checked against the inputs: names, shapes and dtypes up front, from the .npz headers."""
    renamed = None
    if len(specs) == 1 and specs[0].name not in data and len(data) == 1:
        (renamed, array), = data.items()
        data = {specs[0].name: array}
    for spec in specs:
        if spec.name not in data:
            found = ", ".join(f"'{k}' {v.shape}" for k, v in data.items()) or "no arrays"
            raise DataError(f"{source}: no data for input '{spec.name}' {spec.describe()}; found {found} "
                            f"(name the arrays after the model inputs, the class ids '{LABELS_KEY}')")
    feeds = {s.name: cast(check_shape(data[s.name], s, source), s, source) for s in specs}
    n = sample_count(feeds, source)
    if labels is not None:
        labels = check_labels(labels, n, source)
    if renamed is not None:  # said once the data is known to fit (an error stays the only line)
        log.warning("%s: the model's one input is '%s'; using the array '%s' %s for it", source, specs[0].name,
                    renamed, tuple(data[specs[0].name].shape))
    idx = select(n, limit, seed)
    stored = {k for k, v in feeds.items() if isinstance(v, StoredArray)}
    if len(idx) < n:
        feeds = {k: v if k in stored else v[idx] for k, v in feeds.items()}
        labels = None if labels is None else labels[idx]
    rows = idx if len(idx) < n else None  # dataset sample -> file row, for the stored arrays
    dtypes = {s.name: s.dtype for s in specs}

    def fetch(i: np.ndarray) -> Feeds:
        return {k: (v.rows(i if rows is None else rows[i]).astype(dtypes[k], copy=False) if k in stored else v[i])
                for k, v in feeds.items()}

    return Dataset([s.name for s in specs], len(idx), fetch, labels, source=source)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, with numpy dtypes and dims (int, symbol or None)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise DataError(f"model input '{vi.name}' is not a tensor; only tensor inputs can be fed")
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"model input '{vi.name}' has element type {tt.elem_type}, which numpy data "
                            "cannot feed") from None
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def select(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the samples used: all, or a seeded random subset of `limit` in ascending order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# --- images -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImagePlan:
    """Everything decoding needs, resolved once against the model input."""

    spec: InputSpec
    layout: str  # "nchw" | "nhwc"
    mode: str  # PIL mode: "L" | "RGB"
    bgr: bool
    size: tuple[int, int] | None  # (H, W)
    scale: float
    mean: np.ndarray  # (C,) or (1,)
    std: np.ndarray


def _image_folder(folder: Path, specs: list[InputSpec], opts: ImageOptions, limit: int | None, seed: int) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{folder}: reading images needs Pillow; pip install pillow") from None
    source = str(folder)
    if len(specs) != 1:
        names = ", ".join(f"'{s.name}' {s.describe()}" for s in specs)
        raise DataError(f"{source}: a folder of images feeds a model with one input; this one has {names}")
    plan = _image_plan(specs[0], opts, source)
    files, labels, classes = _list_images(folder)
    idx = select(len(files), limit, seed)
    files = [files[i] for i in idx]
    labels = None if labels is None else labels[idx]
    fetch = lambda i: _decode(files, i, plan, Image, source)  # noqa: E731
    fetch(np.arange(1))  # fail now, not mid-evaluation, when the options do not fit the model
    return Dataset([plan.spec.name], len(files), fetch, labels, classes, source)


def _image_plan(spec: InputSpec, opts: ImageOptions, source: str) -> _ImagePlan:
    shape = spec.shape if spec.shape is not None else (None,) * 4
    if len(shape) != 4:
        raise DataError(f"{source}: images make (N, C, H, W) or (N, H, W, C) data, the model input "
                        f"'{spec.name}' expects {spec.describe()}")
    if spec.dtype.kind != "f":
        raise DataError(f"{source}: model input '{spec.name}' {spec.describe()} is {spec.dtype}; "
                        "images need a float input")
    layout = opts.layout
    if layout == "auto":
        layout = "nhwc" if shape[1] not in (1, 3) and shape[3] in (1, 3) else "nchw"
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
    c = shape[c_axis] if isinstance(shape[c_axis], int) else None
    channels = opts.channels if opts.channels != "auto" else ("gray" if c == 1 else "rgb")
    n_ch = 1 if channels == "gray" else 3
    if c is not None and c != n_ch:
        raise DataError(f"{source}: {channels} images have {n_ch} channel(s), the model input '{spec.name}' "
                        f"expects {spec.describe()} ({layout}); choose the channels or layout")
    for what, values in (("mean", opts.mean), ("std", opts.std)):
        if len(values) not in (1, n_ch):
            raise ConfigError(f"{what} has {len(values)} values; {channels} images for input '{spec.name}' "
                              f"have {n_ch} channel(s)")
    model_hw = tuple(d if isinstance(d, int) and d > 0 else None for d in (shape[h_axis], shape[w_axis]))
    size = opts.size or (model_hw if None not in model_hw else None)
    if opts.size and any(m is not None and m != s for m, s in zip(model_hw, opts.size)):
        raise DataError(f"{source}: image size {opts.size[0]}x{opts.size[1]} does not fit the model input "
                        f"'{spec.name}' {spec.describe()} ({layout})")
    return _ImagePlan(spec, layout, "L" if n_ch == 1 else "RGB", channels == "bgr", size, opts.scale,
                      np.asarray(opts.mean, np.float32), np.asarray(opts.std, np.float32))


def _list_images(folder: Path) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """Files sorted by path; with class sub-folders also labels (sorted folder names -> 0..K-1)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    top = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    dirs = [p for p in entries if p.is_dir()]
    per_class = [sorted(f for f in d.rglob("*") if _is_image(f, d)) for d in dirs]
    if not any(per_class):
        if not top:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}), flat or in class sub-folders")
        return top, None, None
    if top:
        raise DataError(f"{folder}: holds both images ({top[0].name}) and class sub-folders ({dirs[0].name}); "
                        "use one or the other")
    files = [f for fs in per_class for f in fs]
    labels = np.repeat(np.arange(len(dirs), dtype=np.int64), [len(fs) for fs in per_class])
    return files, labels, [d.name for d in dirs]


def _is_image(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts
    return path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in rel) and path.is_file()


def _decode(files: list[Path], idx: np.ndarray, plan: _ImagePlan, Image, source: str) -> Feeds:
    """Decode, resize, convert and normalise the images files[idx] into one model-input array."""
    pixels = [_read_image(files[i], plan, Image) for i in idx]  # each (H, W, C) uint8
    sizes = {p.shape[:2] for p in pixels}
    if len(sizes) > 1:
        first, other = pixels[0].shape[:2], next(p for p in pixels if p.shape[:2] != pixels[0].shape[:2]).shape[:2]
        raise DataError(f"{source}: images differ in size ({first[0]}x{first[1]} and {other[0]}x{other[1]}); "
                        "pass an image size (--image-size H W)")
    x = np.stack(pixels).astype(np.float32)  # (n, H, W, C)
    if plan.bgr:
        x = x[..., ::-1]
    x = (x * np.float32(plan.scale) - plan.mean) / plan.std
    if plan.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x, dtype=plan.spec.dtype)
    check_shape(x, plan.spec, source)
    return {plan.spec.name: x}


def _read_image(path: Path, plan: _ImagePlan, Image) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(plan.mode)
            if plan.size is not None and img.size != (plan.size[1], plan.size[0]):
                img = img.resize((plan.size[1], plan.size[0]), getattr(Image, "Resampling", Image).BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"{path}: cannot decode image ({_one_line(e)})") from None
    return arr[..., None] if arr.ndim == 2 else arr


# --- small helpers ----------------------------------------------------------------------------------


def _as_model(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)[0]


def _check_limit(limit) -> None:
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _floats(values, what: str) -> tuple[float, ...]:
    values = (values,) if _is_number(values) else tuple(values)
    if not values or not all(_is_number(v) and math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be one or more finite numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
