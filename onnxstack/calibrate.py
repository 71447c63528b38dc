"""The calibration data walked through the graph once, in order: what the output-aware fitters learn from.

The eligible layers cut the (topologically sorted) graph into segments. `Walk` carries the calibration
data from cut to cut, batch by batch: at each cut it holds the tensors that are live there (made before
the cut, read after it) for every batch, spilled to files in a temporary folder, so memory holds one batch
whatever the number of images (the files sit in the OS page cache while there is room). Two streams
go through the same segments:

- the original model's, whose layer inputs give the targets: the original layer's outputs at sampled
  positions (only `calibration_positions` a layer and image are kept);
- the working model's (`sequential=True`), in which every layer already fitted runs with its decoded
  compressed weight (`install`), so layer l is fitted on the inputs it will see at run time, against the
  original model's outputs. Until the first install the two streams are one.

Each segment runs once per stream in onnxruntime, its session built once: the whole walk costs about two
forward passes of the data, not one a layer. The math of the fits is in core/calib.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analyse import ConvInfo
from .config import CompressConfig
from .core.calib import LayerStats, im2col_rows, output_size
from .core.conv import resolve_pads
from .graphs import subgraph_reads, subgraphs
from .plan import IntPlan, LayerPlan
from .runtime import open_session

BATCH_BYTES = 8 << 20  # graph-input bytes of one batch; its activations are ten or more times that
# (ResNet-50: 256x56x56 maps from a 3x224x224 image), for each stream
MAX_BATCH = 64
MAP_BYTES = 1 << 16  # spilled batches larger than this are memory-mapped when read back


def _geometry(info: ConvInfo, in_hw):
    kh, kw = info.shape[2:]
    strides = list(info.attrs.get("strides", [1, 1]))
    dil = list(info.attrs.get("dilations", [1, 1]))
    pads = resolve_pads(in_hw, (kh, kw), strides, dil, info.attrs.get("pads"), info.attrs.get("auto_pad", "NOTSET"))
    return dict(kernel=(kh, kw), strides=strides, pads=pads, dilations=dil)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, its subgraphs' outer-scope reads included."""
    names = {n for n in node.input if n}
    for _, g in subgraphs(node):
        names |= {n for x in g.node for n in x.input if n} | subgraph_reads(g)
    return names


@dataclass
class _Segment:
    start: int
    stop: int
    inputs: list[str]   # live at start and read by nodes[start:stop]
    outputs: list[str]  # made by nodes[start:stop] and live at stop


PENDING_BYTES = 48 << 20  # rows gathered over batches before they are added to a layer's stats, and ...
PENDING_ROWS = (1024, 8192)  # ... at least / at most this many rows (see _Pending)


class _Pending:
    """Rows of several batches added to LayerStats in one product: X^T X over a few thousand rows runs at
    about twice the BLAS rate of one batch's few hundred (K = 4608: 290 against 150 GFLOP/s on 2 cores).
    One preallocated buffer of PENDING_BYTES (within PENDING_ROWS rows): memory does not grow with the data."""

    def __init__(self, stats: LayerStats):
        K, N = stats.sxy.shape
        rows = int(np.clip(PENDING_BYTES // (4 * (K + N)), *PENDING_ROWS))
        self.stats, self.x, self.y, self.filled = stats, np.empty((rows, K), np.float32), np.empty((rows, N), np.float32), 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        while len(x):
            take = min(len(x), len(self.x) - self.filled)
            self.x[self.filled:self.filled + take], self.y[self.filled:self.filled + take] = x[:take], y[:take]
            self.filled, x, y = self.filled + take, x[take:], y[take:]
            if self.filled == len(self.x):
                self._flush()

    def _flush(self) -> None:
        if self.filled:
            self.stats.add(self.x[:self.filled], self.y[:self.filled])
        self.filled = 0

    def done(self) -> LayerStats:
        self._flush()
        return self.stats


HELD_OUT_EVERY = 4  # a quarter of the samples measures, the rest fits
MIN_HELD_OUT_SAMPLES = 4


def held_out_mask(n: int, seed: int) -> np.ndarray | None:
    """The samples whose rows are not fitted on but measure a fit (the settings search's damage and
    sensitivities, the ridge of layers the data cannot pin down): a seeded random 1/HELD_OUT_EVERY of them,
    at least one; None (everything in-sample) below MIN_HELD_OUT_SAMPLES samples."""
    if n < MIN_HELD_OUT_SAMPLES:
        return None
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[: max(1, n // HELD_OUT_EVERY)]] = True
    return mask


class Walk:
    """Calibration statistics for the layers in graph order, on bounded memory (module docstring). `feeds`:
    a dict of arrays, or a data.Dataset, whose batches are read (and spilled) one at a time at the first cut.

        with Walk(model, layers, feeds, config, sequential=True) as walk:
            for info, stats in walk:        # stats: LayerStats, or None where `needs(info)` is false
                plan = fit(info, stats)
                walk.install(info, plan)    # the working stream runs the layer compressed from here on
    """

    def __init__(self, model: onnx.ModelProto, layers: list[ConvInfo], feeds,
                 config: CompressConfig, sequential: bool = True, needs=lambda info: info.group == 1,
                 folder: str | None = None, held_out: np.ndarray | bool | None = None):
        self.model, self.config, self.sequential, self.needs = model, config, sequential, needs
        self.layers = sorted(layers, key=lambda i: i.node_index)
        self.feeds = feeds  # dict of arrays, or a Dataset read a batch at a time at the first cut
        if isinstance(feeds, Mapping):
            self.n = len(next(iter(feeds.values())))
            per_sample = sum(v[:1].nbytes for v in feeds.values()) or 1
            self.batch = int(np.clip(BATCH_BYTES // per_sample, 1, MAX_BATCH))
        else:
            self.n = len(feeds)
            self.batch = feeds.batch_for(BATCH_BYTES, MAX_BATCH)
        self.starts = list(range(0, self.n, self.batch))
        # a boolean mask over the samples (True: held_out_mask's, None below its minimum): each layer's stats
        # then come as (fit, held) from the rows of the other samples and of these (the search fits on one
        # part and measures damage on the other; the final fit chooses its ridge on it)
        if held_out is True:
            held_out = held_out_mask(self.n, config.seed)
        self.held_out = None if held_out is None or held_out is False else np.asarray(held_out, bool)
        self.weights = {t.name: t for t in model.graph.initializer}
        self.replaced: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # node index -> decoded (w, b)
        self.rng = np.random.default_rng(config.seed)
        self._folder = folder
        self._dir: str | None = None
        nodes = model.graph.node
        self._reads = [_reads(n) for n in nodes]
        last: dict[str, int] = {}
        for i, names in enumerate(self._reads):
            for name in names:
                last[name] = i
        self._last = last
        inputs = list(feeds) if isinstance(feeds, Mapping) else list(feeds.input_names)
        self._made = {name: -1 for name in inputs}  # graph inputs are made "before node 0"
        for i, node in enumerate(nodes):
            for name in node.output:
                if name:
                    self._made[name] = i
        # per stream: name -> file key of each live tensor ("orig" and "work"; work aliases orig until it diverges)
        self._files: dict[str, dict[str, str]] = {"orig": {}, "work": {}}
        self._counter = 0
        self._at = 0  # node index of the current cut

    # --- context: the spill folder is removed whatever happens (Ctrl-C included) ---------------------------
    def __enter__(self) -> "Walk":
        self._dir = tempfile.mkdtemp(prefix="onnxstack-calib-", dir=self._folder)
        return self

    def __exit__(self, *exc) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # --- the walk --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[ConvInfo, LayerStats | None]]:
        if self._dir is None:
            raise RuntimeError("use Walk as a context manager (with Walk(...) as walk)")
        cuts = sorted({i.node_index for i in self.layers})
        for cut in cuts:
            self._advance(cut)
            for info in (i for i in self.layers if i.node_index == cut):
                yield info, (self._stats(info) if self.needs(info) else None)

    def install(self, info: ConvInfo, plan: LayerPlan | IntPlan) -> None:
        """From now on the working stream runs this layer with the plan's decoded weight and bias."""
        if self.sequential:
            self.replaced[info.node_index] = (plan.decoded_weight(), plan.bias)

    # --- internals -------------------------------------------------------------------------------------------
    def _live(self, at: int) -> set[str]:
        return {t for t, made in self._made.items() if made < at and self._last.get(t, -1) >= at}

    def _segment(self, start: int, stop: int) -> _Segment:
        made_here = {o for n in self.model.graph.node[start:stop] for o in n.output if o}
        reads = set().union(*self._reads[start:stop]) if stop > start else set()
        live_start = self._live(start)
        return _Segment(start, stop, sorted(r for r in reads if r in live_start),
                        sorted(t for t in self._live(stop) if t in made_here))

    def _advance(self, cut: int) -> None:
        if cut == self._at and self._counter > 0:
            return
        if self._counter == 0 and self._at == 0:  # first cut: the feeds are the live tensors at node 0
            if isinstance(self.feeds, Mapping):
                batches = ({k: v[s:s + self.batch] for k, v in self.feeds.items()} for s in self.starts)
            else:
                batches = (feeds for feeds, _ in self.feeds.batches(self.batch))
            for j, feeds in enumerate(batches):
                for name, value in feeds.items():
                    self._put("orig", name, j, value)
            for name in self._files["orig"]:
                self._files["work"][name] = self._files["orig"][name]
        seg = self._segment(self._at, cut)
        if seg.outputs:
            diverged = self.sequential and (any(self._files["work"][t] != self._files["orig"][t] for t in seg.inputs)
                                            or any(self._at <= k < cut for k in self.replaced))
            self._run("orig", seg, replaced={})
            if diverged:
                self._run("work", seg, replaced=self.replaced)
            else:
                for t in seg.outputs:
                    self._files["work"][t] = self._files["orig"][t]
        live = self._live(cut)
        for stream in ("orig", "work"):
            self._files[stream] = {t: f for t, f in self._files[stream].items() if t in live}
        self._collect()
        self._at = cut

    def _run(self, stream: str, seg: _Segment, replaced: dict) -> None:
        model = self._segment_model(seg, stream, replaced)
        sess = open_session(model)
        for j in range(len(self.starts)):
            feeds = {t: self._get(stream, t, j) for t in seg.inputs}
            for t, value in zip(seg.outputs, sess.run(seg.outputs, feeds)):
                self._put(stream, t, j, value)

    def _segment_model(self, seg: _Segment, stream: str, replaced: dict) -> onnx.ModelProto:
        reads = set().union(*self._reads[seg.start:seg.stop])
        inits = [self.weights[r] for r in sorted(reads) if r in self.weights and r not in seg.inputs]
        probe = {t: self._get(stream, t, 0) for t in seg.inputs}
        inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(probe[t].dtype), None)
                  for t in seg.inputs]
        outputs = [helper.make_empty_tensor_value_info(t) for t in seg.outputs]
        graph = helper.make_graph(self.model.graph.node[seg.start:seg.stop], "segment", inputs, outputs,
                                  initializer=inits)
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        for k, (w, b) in replaced.items():
            if seg.start <= k < seg.stop:
                install_weights(m, k - seg.start, w, b, tag=f"__calib{k}")
        return m

    def _stats(self, info: ConvInfo) -> LayerStats | tuple[LayerStats, LayerStats]:
        """The layer's input (working stream) against the original layer's outputs at sampled positions;
        with `held_out`, (stats of the other samples' rows, stats of the held-out samples' rows)."""
        name = self.model.graph.node[info.node_index].input[0]
        w = numpy_helper.to_array(self.weights[info.weight_name]).reshape(info.shape[0], -1)
        b = numpy_helper.to_array(self.weights[info.bias_name]) if info.bias_name else 0.0
        stats = _Pending(LayerStats.empty(int(np.prod(info.shape[1:])), info.shape[0]))
        held = None if self.held_out is None else _Pending(LayerStats.empty(*stats.stats.sxy.shape))
        for j, start in enumerate(self.starts):
            x = self._get("orig", name, j)
            geo = _geometry(info, x.shape[2:])
            ho, wo = output_size(x.shape[2:], geo["kernel"], geo["strides"], geo["pads"], geo["dilations"])
            p = min(self.config.calibration_positions, ho * wo)
            pos = np.argsort(self.rng.random((len(x), ho * wo)), axis=1)[:, :p]  # (B, p) distinct positions
            rows = im2col_rows(x, pos, **geo)
            y = rows @ w.T + b
            if self._files["work"][name] != self._files["orig"][name]:
                rows = im2col_rows(self._get("work", name, j), pos, **geo)
            if held is None:
                stats.add(rows, y)
                continue
            samples = self.held_out[start:start + self.batch]
            if len(x) != len(samples):  # the tensor's first axis is not the samples' (a sequence model's
                stats.add(rows, y)      # (T*B, C) rows): which rows are whose is unknown, all are fitted
                continue
            out = np.repeat(samples, p)  # rows are sample-major: p a sample
            stats.add(rows[~out], y[~out])
            held.add(rows[out], y[out])
        return stats.done() if held is None else (stats.done(), held.done())

    # --- the spill files ------------------------------------------------------------------------------------
    def _put(self, stream: str, name: str, j: int, value: np.ndarray) -> None:
        if j == 0:  # a tensor's batches go to a folder of their own, made with the first
            self._counter += 1
            key = f"t{self._counter}"
            os.mkdir(os.path.join(self._dir, key))
            self._files[stream][name] = key
        key = self._files[stream][name]
        # asarray, not ascontiguousarray: that makes a 0-d value (a batch size from Shape -> Gather) 1-d, and the
        # segment that reads it back then fails (EfficientNet's x.view(x.size(0), -1))
        np.save(os.path.join(self._dir, key, f"{j}.npy"), np.asarray(value, order="C"), allow_pickle=False)

    def _get(self, stream: str, name: str, j: int) -> np.ndarray:
        """One batch of a spilled tensor, mapped rather than read (no copy: onnxruntime reads the pages
        of the OS cache, im2col touches only the sampled windows); small ones (0-d shapes) are read."""
        path = os.path.join(self._dir, self._files[stream][name], f"{j}.npy")
        return np.load(path, mmap_mode="r" if os.path.getsize(path) > MAP_BYTES else None, allow_pickle=False)

    def _collect(self) -> None:
        """Remove the files no stream refers to any more."""
        keep = set(self._files["orig"].values()) | set(self._files["work"].values())
        for key in os.listdir(self._dir):
            if key not in keep:
                shutil.rmtree(os.path.join(self._dir, key), ignore_errors=True)


def install_weights(model: onnx.ModelProto, node_index: int, weight: np.ndarray, bias: np.ndarray | None,
                    tag: str) -> None:
    """Make a Conv of the model read `weight` (and `bias`, when given) from new initializers named NAME+tag."""
    node = model.graph.node[node_index]
    wname = node.input[1] + tag
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(weight, np.float32), wname))
    node.input[1] = wname
    if bias is not None:
        bname = wname + "_bias"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(bias, np.float32), bname))
        node.input.extend([""] * (3 - len(node.input)))
        node.input[2] = bname
