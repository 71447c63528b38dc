"""Block reconstruction: blocks found from the graph, the block loss drops, the written model keeps its
structure and runs in onnxruntime, runs are deterministic, bad options fail with one clear line; the
per-block held-out guard puts back what does not pay, blocks with too few rows are not trained, and
compress runs it only when asked (reconstruct=True / --reconstruct; None, False, --no-reconstruct skip it)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxstack  # noqa: E402
from onnxstack.errors import ConfigError, DataError  # noqa: E402
from onnxstack.torch_bridge.blocks import find_blocks  # noqa: E402
from onnxstack.torch_bridge import reconstruct as rc  # noqa: E402
from onnxstack.torch_bridge.reconstruct import METADATA_KEY, ReconstructConfig, reconstruct  # noqa: E402

from .models import run_ort  # noqa: E402

torch.set_num_threads(1)
FAST = dict(steps=60, batch_size=16, threads=1, held_out=0, min_rows=0)  # judged by the training loss, every block
HELD = dict(steps=60, batch_size=16, threads=1, check_every=20)  # the defaults' held-out guard


def tiny(residual: bool, seed: int = 0, c: int = 4, hw: int = 6, classes: int = 5, head: bool = False) -> onnx.ModelProto:
    """conv0-Relu, then conv1-Relu-conv2 (+ r0 -> Add when residual) -Relu, Flatten, Gemm (with head: Gemm
    fc to 16, Relu, Gemm fc2)."""
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:])))
                                             .astype(np.float32), name))
        return name

    pads = dict(pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", w("c0.w", 8, c, 3, 3)], ["h0"], name="conv0", **pads),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", w("c1.w", 8, 8, 3, 3)], ["h1"], name="conv1", **pads),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", w("c2.w", 8, 8, 3, 3)], ["h2"], name="conv2", **pads),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["h2", "r0"], ["s"], name="add"))
    nodes += [helper.make_node("Relu", ["s" if residual else "h2"], ["r2"], name="relu2"),
              helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", w("fc.w", 16 if head else classes, 8 * hw * hw)],
                               ["h" if head else "logits"], name="fc", transB=1)]
    if head:
        nodes += [helper.make_node("Relu", ["h"], ["rh"], name="relu_fc"),
                  helper.make_node("Gemm", ["rh", w("fc2.w", classes, 16)], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, hw, hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module", params=[False, True], ids=["chain", "residual"])
def case(request):
    original = tiny(request.param)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((96, 4, 6, 6)).astype(np.float32)
    model, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**FAST))
    return original, compressed, x, model, report


def test_blocks_chain_and_residual():
    chain = onnxstack.compress(tiny(False), onnxstack.CompressConfig(slice_dim=4, codebook_size=4, skip=("fc",))).model
    blocks = find_blocks(chain)
    assert [(b.layers, b.inputs, b.output) for b in blocks] == [
        (("conv0",), ("x",), "r0"), (("conv1",), ("r0",), "r1"), (("conv2",), ("r1",), "r2")]
    assert [b.layers for b in find_blocks(chain, group=2)] == [("conv0", "conv1"), ("conv2",)]
    res = onnxstack.compress(tiny(True), onnxstack.CompressConfig(slice_dim=4, codebook_size=4, skip=("fc",))).model
    blocks = find_blocks(res)
    assert [(b.layers, b.inputs, b.output, b.kind) for b in blocks] == [
        (("conv0",), ("x",), "r0", "block"), (("conv1", "conv2"), ("r0",), "r2", "block")]
    # a cut-free region with more layers than allowed: one layer a block, each with its own activation
    assert [(b.layers, b.output, b.kind) for b in find_blocks(res, max_layers=1)][1:] == [
        (("conv1",), "r1", "layer"), (("conv2",), "h2", "layer")]


def test_runs_in_onnxruntime_and_passes_checker(case):
    original, _, x, model, report = case
    onnx.checker.check_model(model, full_check=True)
    (y,) = run_ort(model, {"x": x[:7]})
    assert y.shape == (7, 5) and np.isfinite(y).all()
    assert METADATA_KEY in {p.key for p in model.metadata_props}
    assert report["totals"]["blocks"] == len(report["blocks"]) > 0


def test_block_loss_drops(case):
    _, _, _, _, report = case
    blocks = report["blocks"]
    assert all(b["steps"] == FAST["steps"] for b in blocks)
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks)  # a block that got worse is put back
    assert all(b["kept"] == (b["loss_trained"] < b["loss_before"]) for b in blocks)
    assert sum(b["loss_after"] for b in blocks) < 0.9 * sum(b["loss_before"] for b in blocks)
    assert blocks[-1]["kept"] and blocks[-1]["loss_after"] < 0.9 * blocks[-1]["loss_before"]


def test_output_error_drops(case):
    original, compressed, x, model, _ = case
    (ref,) = run_ort(original, {"x": x})
    err = [float(np.mean((run_ort(m, {"x": x})[0] - ref) ** 2)) for m in (compressed, model)]
    assert err[1] < err[0]


def test_structure_unchanged(case):
    _, compressed, _, model, _ = case

    def structure(m):
        nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output), n.SerializeToString()
                  if n.op_type != "Constant" else b"") for n in m.graph.node]
        inits = [(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer]
        return nodes, inits, [f.name for f in m.functions], list(m.graph.input), list(m.graph.output)

    assert structure(model) == structure(compressed)
    changed = [t.name for t, u in zip(model.graph.initializer, compressed.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()]
    assert changed and all(".weight" in n or n.startswith("c") for n in changed)


def test_deterministic_for_a_seed(case):
    original, compressed, x, model, _ = case
    again, _ = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**FAST))
    assert [t.SerializeToString() for t in again.graph.initializer] == \
           [t.SerializeToString() for t in model.graph.initializer]


def test_qdrop_reassign_channel_loss_and_image_cap():
    original = tiny(True)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((64, 4, 6, 6)).astype(np.float32)
    config = ReconstructConfig(**FAST, qdrop=0.5, reassign_every=20, loss="channel", max_images=40)
    model, report = reconstruct(original, compressed, {"x": x, "labels": np.zeros(64)}, config)
    onnx.checker.check_model(model, full_check=True)
    assert report["totals"]["images"] == 40 and all(b["images"] == 40 for b in report["blocks"])
    assert all(b["loss_after"] <= b["loss_before"] for b in report["blocks"])


def test_time_limit_stops_early():
    original = tiny(False)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    x = np.random.default_rng(1).standard_normal((32, 4, 6, 6)).astype(np.float32)
    _, report = reconstruct(original, compressed, x, ReconstructConfig(steps=10**6, threads=1, max_minutes=0.02))
    assert report["totals"]["seconds"] < 20 and all(b["steps"] < 10**6 for b in report["blocks"])


@pytest.mark.parametrize("bad", [
    dict(steps=0), dict(steps=1.5), dict(batch_size=-1), dict(lr=0), dict(latent_lr=float("nan")),
    dict(qdrop=1.5), dict(loss="l1"), dict(reassign_every=-1), dict(max_minutes=0), dict(device="tpu"),
    dict(train_latent=False, train_scales=False, train_bias=False), dict(group=0), dict(train_bias="yes"),
    dict(held_out=1), dict(held_out=-0.1), dict(check_every=0), dict(patience=-1), dict(min_rows=-1),
    dict(min_rows=float("inf")),
])
def test_bad_config_raises_one_line(bad):
    with pytest.raises(ConfigError) as e:
        ReconstructConfig(**bad)
    assert "\n" not in str(e.value) and str(e.value)
    with pytest.raises(ConfigError):
        ReconstructConfig.from_dict({"stepz": 3})


def test_bad_data_raises():
    original = tiny(False)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    with pytest.raises(DataError, match="no data for model input"):
        reconstruct(original, compressed, {"input": np.zeros((4, 4, 6, 6), np.float32)}, ReconstructConfig(**FAST))


# --- the per-block held-out guard, rows, default-on wiring ---------------------------------------------------


def _compressed(residual=False, head=False):
    original = tiny(residual, head=head)
    compressed = onnxstack.compress(original, onnxstack.CompressConfig(slice_dim=4, codebook_size=4),
                                    reconstruct=False).model
    x = np.random.default_rng(1).standard_normal((96, 4, 6, 6)).astype(np.float32)
    return original, compressed, x


def _inits(model):
    return [t.SerializeToString() for t in model.graph.initializer]


def test_held_out_guard_puts_back_a_block_whose_held_out_error_rises(monkeypatch):
    """Training lowers the blocks' training loss, but the (stubbed) held-out output error rises at every check:
    each block goes back to its closed-form values, and the written model is the compressed one."""
    original, compressed, x = _compressed()
    rising = iter(range(10**6))
    monkeypatch.setattr(rc._Run, "output_error", lambda self: float(next(rising)))
    model, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**HELD, min_rows=0))
    blocks = report["blocks"]
    assert blocks and report["totals"]["images_held_out"] == 12 and report["totals"]["images"] == 84
    assert any(b["loss_trained"] < b["loss_before"] for b in blocks)  # the training-loss guard would keep these
    assert not any(b["kept"] for b in blocks) and all(b["best_step"] == 0 for b in blocks)
    assert all(b["loss_after"] == b["loss_before"] for b in blocks)
    assert _inits(model) == _inits(compressed)
    _, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**dict(HELD, steps=400), patience=2))
    assert all(b["steps"] == 40 for b in report["blocks"])  # two checks without a new best: stop


def test_held_out_guard_keeps_the_best_check(monkeypatch):
    """A held-out error that falls until the second check and rises after: the block keeps the values of step 40."""
    original, compressed, x = _compressed()
    errors = {}

    def stub(self):
        calls = errors.setdefault(id(self), [])
        calls.append(None)
        return [5.0, 4.0, 3.0, 3.5, 3.6][min(len(calls), 5) - 1] if len(calls) <= 4 else 9.0

    def fresh(self, *a, **k):
        errors.clear()
        return real(self, *a, **k)

    real = rc._Run._block
    monkeypatch.setattr(rc._Run, "output_error", stub)
    monkeypatch.setattr(rc._Run, "_block", fresh)
    _, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**HELD, min_rows=0))
    for b in report["blocks"]:
        assert b["kept"] and b["best_step"] == 40
        assert b["held_out_output_error_before"] == 5.0 and b["held_out_output_error_after"] == 3.0


def test_real_held_out_guard_never_raises_the_held_out_error():
    original, compressed, x = _compressed(residual=True)
    _, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**HELD))
    blocks = report["blocks"]
    assert blocks and all(b["held_out_output_error_after"] <= b["held_out_output_error_before"] for b in blocks)
    assert all(b["kept"] == (b["best_step"] > 0) for b in blocks)
    for prev, nxt in zip(blocks, blocks[1:]):  # the next block starts from what the previous one left
        assert nxt["held_out_output_error_before"] == pytest.approx(prev["held_out_output_error_after"], rel=1e-5)


def test_blocks_with_too_few_rows_are_not_trained():
    """84 training images x 36 output positions = 3,024 rows: conv0 (4 x 3 x 3 = 36 input features) trains at
    min_rows=50 (1,800 needed), conv1 and conv2 (72 features, 3,600 needed) keep their closed-form values."""
    original, compressed, x = _compressed()
    model, report = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**HELD, min_rows=50))
    assert [b["block"] for b in report["blocks"]] == ["conv0"]
    short = {s["block"]: s["reason"] for s in report["skipped"] if "training rows" in s["reason"]}
    assert sorted(short) == ["conv1", "conv2"]
    assert "3024 training rows" in short["conv1"] and "72 input features" in short["conv1"]
    kept = {t.name: u for t, u in zip(compressed.graph.initializer, model.graph.initializer)}
    frozen = [t for t in compressed.graph.initializer if t.name.startswith(("c1.w", "c2.w"))]
    assert len(frozen) == 6 and all(t.SerializeToString() == kept[t.name].SerializeToString() for t in frozen)
    _, trained = reconstruct(original, compressed, {"x": x}, ReconstructConfig(**HELD, min_rows=0))
    assert {"conv0", "conv1", "conv2"} <= {b["block"] for b in trained["blocks"]}


def test_compress_reconstructs_when_asked():
    x = np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32)
    config = onnxstack.CompressConfig(slice_dim=4, codebook_size=4)
    on = onnxstack.compress(tiny(False), config, data={"x": x}, reconstruct=ReconstructConfig(**HELD))
    rec = on.report["reconstruction"]
    assert rec["ran"] and rec["held_out_samples"] == 8 and rec["totals"]["images"] + rec["totals"]["images_held_out"] == 40
    assert set(rec["held_out_output_error"]) == {"closed_form", "reconstructed"}
    off = onnxstack.compress(tiny(False), config, data={"x": x}, reconstruct=False)
    assert off.report["reconstruction"] == {"ran": False, "why": "not asked for"}
    if not rec["kept"]:
        assert _inits(on.model) == _inits(off.model)
    none = onnxstack.compress(tiny(False), config, reconstruct=True)
    assert none.report["reconstruction"] == {"ran": False, "why": "no calibration data"}


def test_a_model_the_torch_bridge_cannot_run_keeps_its_closed_form_fit_with_a_reason():
    # ddddocr's OCR model has an LSTM: reconstruct=True used to fail the whole compression with the bridge's error
    model = tiny(False)
    next(n for n in model.graph.node if n.name == "relu2").op_type = "Softsign"  # onnxruntime has it, the bridge not
    x = np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32)
    config = onnxstack.CompressConfig(slice_dim=4, codebook_size=4)
    on = onnxstack.compress(model, config, data={"x": x}, reconstruct=ReconstructConfig(**HELD))
    rec = on.report["reconstruction"]
    assert rec["ran"] is False and "Softsign" in rec["why"] and "closed-form fit is kept" in rec["why"]
    off = onnxstack.compress(model, config, data={"x": x}, reconstruct=False)
    assert _inits(on.model) == _inits(off.model)


def test_default_does_not_reconstruct(monkeypatch):
    """reconstruct=None (the default) and False skip the stage; True runs it with the default config."""
    calls = []
    monkeypatch.setattr(rc, "reconstruct", lambda o, c, feeds, config: calls.append(config) or
                        (c, {"totals": {"kept": 0}}))
    x = np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32)
    config = onnxstack.CompressConfig(slice_dim=4, codebook_size=4)
    for option in (None, False):
        result = onnxstack.compress(tiny(False), config, data={"x": x}, reconstruct=option)
        assert result.report["reconstruction"] == {"ran": False, "why": "not asked for"}
    assert calls == []
    result = onnxstack.compress(tiny(False), config, data={"x": x}, reconstruct=True)
    assert calls == [ReconstructConfig()] and result.report["reconstruction"]["ran"]
    assert not result.report["reconstruction"]["kept"]  # equal held-out errors: the closed form stays


def test_without_torch_true_fails(monkeypatch):
    import sys

    from onnxstack.errors import ConfigError as CE

    monkeypatch.setitem(sys.modules, "onnxstack.torch_bridge.reconstruct", None)  # import fails
    x = np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32)
    config = onnxstack.CompressConfig(slice_dim=4, codebook_size=4)
    assert onnxstack.compress(tiny(False), config, data={"x": x}).report["reconstruction"]["ran"] is False
    with pytest.raises(CE, match="needs torch"):
        onnxstack.compress(tiny(False), config, data={"x": x}, reconstruct=True)


def test_cli_reconstruct_flags(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from cli import main

    onnx.save(tiny(False), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32))
    seen = []
    real = rc.reconstruct
    monkeypatch.setattr(rc, "reconstruct", lambda o, c, f, config: seen.append(config) or
                        real(o, c, f, ReconstructConfig(**dict(HELD, steps=min(config.steps, 60)))))
    base = ["compress", tmp_path / "m.onnx", "-d", "4", "-m", "4", "--data", tmp_path / "d.npz", "-q"]
    runs = (["--no-reconstruct"], "off"), ([], "default"), (["--reconstruct"], "on"), \
        (["--reconstruct", "--reconstruct-steps", "7"], "steps")
    for extra, name in runs:
        r = CliRunner().invoke(main, [str(a) for a in
                                      [*base, *extra, "-o", tmp_path / f"{name}.onnx", "--report", tmp_path / f"{name}.json"]])
        assert r.exit_code == 0, r.output
    reports = {n: json.loads((tmp_path / f"{n}.json").read_text())["reconstruction"] for _, n in runs}
    assert reports["off"] == reports["default"] == {"ran": False, "why": "not asked for"}
    assert reports["on"]["ran"] and reports["steps"]["ran"]
    assert [c.steps for c in seen] == [ReconstructConfig().steps, 7]
