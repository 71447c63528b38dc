"""The pipeline's structure and the defects its redesign fixed: fitters that say why, no silent fallback,
constant folding, numerically safe fits, data that names itself."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxstack
from onnxstack import CompressConfig, ConfigError, DataError

from .models import conv_model, run_ort

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnxstack"
PINS = Path(__file__).with_name("pins.json")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """onnxstack modules a module imports, anywhere in it (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                out.add(f"{target}.{alias.name}")
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_cycles_among_modules():
    modules = _modules()
    graph = {m: {t for t in _imports(m, p) if t in modules and t != m and not m.startswith(t + ".")
                 and t != "onnxstack"} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_nothing_imports_the_pipeline_back():
    for name, path in _modules().items():
        if name not in ("onnxstack.pipeline", "onnxstack.api"):
            assert "onnxstack.pipeline" not in _imports(name, path), name


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 460, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_numpy_core_imports_without_onnx_protobuf_or_torch():
    code = ("import sys, onnxstack.core.fit, onnxstack.core.calib, onnxstack.core.cost, onnxstack.core.bits; "
            "print(sorted(m for m in ('onnx', 'google.protobuf', 'torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- same inputs, same bytes as before the redesign --------------------------------------------------


def _pin_cases():
    fashion, mnist = ROOT / "sample_models/fashion_cnn.onnx", ROOT / "sample_models/mnist_cnn.onnx"
    calib = {n: np.load(ROOT / f"sample_models/data/{n}_calib.npz")["input"] for n in ("fashion", "mnist")}
    return {
        "fashion_default": lambda: onnxstack.compress(fashion),
        "fashion_k2_stacked": lambda: onnxstack.compress(fashion, CompressConfig(terms=2, codebook_size=64,
                                                                                 execution="stacked")),
        "mnist_d8_data": lambda: onnxstack.compress(mnist, CompressConfig(slice_dim=8, terms=2),
                                                    data={"input": calib["mnist"][:150]}),
    }


def _blas_core() -> str:
    from threadpoolctl import threadpool_info

    np.ones((4, 4)) @ np.ones((4, 4))
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ",".join(sorted({f"{i.get('architecture')}x{i.get('num_threads')}" for i in blas}))


def test_outputs_are_byte_identical_to_the_pinned_ones():
    """Pinned from the pipeline before its redesign (tests/pins.json). Floating-point sums differ between
    BLAS kernels, so the pins hold where they were made: same numpy, same BLAS core."""
    pins = json.loads(PINS.read_text())
    env = {"numpy": np.__version__, "blas": _blas_core(), "onnx": onnx.__version__}
    if env != pins["environment"]:
        pytest.skip(f"pins were made with {pins['environment']}, this is {env}")
    for name, run in _pin_cases().items():
        digest = hashlib.sha256(run().model.SerializeToString()).hexdigest()
        assert digest == pins["sha256"][name], name


# --- fitters: what was asked, or why not ---------------------------------------------------------------


def _feeds(model, n=48, seed=0):
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = n
    return {"input": np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def test_grouped_layer_with_data_names_its_fallback_in_report_and_table():
    from onnxstack.report import format_table

    model = conv_model([{"in": 16, "out": 32}, {"out": 32, "group": 2}])
    result = onnxstack.compress(model, CompressConfig(slice_dim=8), data=_feeds(model))
    plain, grouped = result.report["layers"]
    assert plain["fitter"] == "output" and "fallback" not in plain
    assert grouped["fitter"] == "weights" and "group=2" in grouped["fallback"]
    assert f"* conv1: {grouped['fallback']}" in format_table(result.report)


def test_filter_scales_with_data_are_calibrated_not_thrown_away():
    model = conv_model([{"in": 16, "out": 32}, {"out": 32}, {"out": 32}])
    calib, test = _feeds(model, 64, 0), _feeds(model, 64, 1)
    ref = run_ort(model, test)[0]
    cfg = CompressConfig(slice_dim=8, scale="filter")
    plain = onnxstack.compress(model, cfg)
    calibrated = onnxstack.compress(model, cfg, data=calib)
    assert all(e["fitter"] == "output" and e["scale"] == "filter" for e in calibrated.report["layers"])

    def err(r):
        return float(np.mean((run_ort(r.model, test)[0] - ref) ** 2) / np.mean(ref ** 2))

    assert err(calibrated) < 0.7 * err(plain)


def test_target_ratio_with_filter_scales_counts_filter_scales():
    model = conv_model([{"in": 16, "out": 32}, {"out": 64}, {"out": 64}])
    for target in (40, 80):
        result = onnxstack.compress(model, CompressConfig(slice_dim=8, scale="filter"), data=_feeds(model),
                                    target_ratio=target)
        assert target / 1.15 <= result.report["conv_ratio"] <= target * 1.15, target


def test_target_ratio_refuses_an_explicit_codebook_size():
    model = conv_model([{"in": 16, "out": 32}, {"out": 32}])
    with pytest.raises(ConfigError, match="chooses the codebook size"):
        onnxstack.compress(model, CompressConfig(slice_dim=8, codebook_size=8), data=_feeds(model), target_ratio=8)


def _classifier():
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten: 32 logits, margins like a small trained model's."""
    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 32, "pads": [1, 1, 1, 1]}], hw=(8, 8))
    graph = model.graph
    graph.node[-1].output[0] = "r1"
    graph.node.extend([helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
                       helper.make_node("Flatten", ["gap"], ["output"])])
    del graph.value_info[:]
    graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 32]))
    return model


def test_max_drop_logs_and_records_every_try(caplog):
    model = _classifier()
    with caplog.at_level(logging.INFO, logger="onnxstack"):
        result = onnxstack.compress(model, CompressConfig(slice_dim=8), data=_feeds(model, 64), max_drop=40)
    tries = result.report["search"]
    assert tries and all({"target_ratio", "conv_ratio", "drop_points", "passed"} <= set(t) for t in tries)
    assert all(t["passed"] == (t["drop_points"] <= 40) for t in tries)
    assert result.report["target_ratio"] == max(t["target_ratio"] for t in tries if t["passed"])
    assert sum("max-drop search" in r.getMessage() for r in caplog.records) == len(tries)


# --- normalise: constants folded, opsets upgraded on a valid input --------------------------------------


def _shared_through_identity():
    """Two Convs whose biases are one zero initializer shared through Identity nodes, and a weight reached
    through Identity -> Reshape, as torch.onnx.export writes them."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)
    w1 = (rng.standard_normal((16 * 16 * 9,)) * 0.2).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1_flat"),
             numpy_helper.from_array(np.zeros(16, np.float32), "zeros"),
             numpy_helper.from_array(np.array([16, 16, 3, 3], np.int64), "shape")]
    nodes = [helper.make_node("Identity", ["zeros"], ["b0"]), helper.make_node("Identity", ["zeros"], ["b1"]),
             helper.make_node("Identity", ["w1_flat"], ["w1_id"]),
             helper.make_node("Reshape", ["w1_id", "shape"], ["w1"]),
             helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w1", "b1"], ["y"], name="conv1", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_constant_chains_feeding_weights_and_biases_are_folded():
    model = _shared_through_identity()
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert [e.get("skipped") for e in result.report["layers"]] == [None, None]
    assert not any(n.op_type in ("Identity", "Reshape") for n in result.model.graph.node)
    # the same layers with plain initializers compress to the same values
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    del plain.graph.initializer[:], plain.graph.node[:4]
    plain.graph.initializer.extend([numpy_helper.from_array(arrays["w0"], "w0"),
                                    numpy_helper.from_array(arrays["w1_flat"].reshape(16, 16, 3, 3), "w1"),
                                    numpy_helper.from_array(arrays["zeros"], "b0"),
                                    numpy_helper.from_array(arrays["zeros"], "b1")])
    x = np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float32)
    expected = run_ort(onnxstack.compress(plain, CompressConfig(slice_dim=8)).model, {"x": x})[0]
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], expected)


def test_opset_11_model_with_negative_dims_is_upgraded_and_verified():
    model = conv_model([{"in": 16, "out": 16}, {"out": 16}], opset=11, ir_version=6)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1  # some exporters write -1 for a dynamic dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    del model.graph.value_info[:]
    result = onnxstack.compress(model, CompressConfig(slice_dim=8))
    assert result.report["layers_compressed"] == 2
    x = np.random.default_rng(0).standard_normal((1, 16, 12, 12)).astype(np.float32)
    assert run_ort(result.model, {"input": x})[0].shape == (1, 16, 8, 8)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_batch_of_1_declared_inside_a_dynamic_model_does_not_pin_the_compressed_one(opset):
    # ddddocr-style: the input's batch made dynamic, the exporter's value_info still says batch 1. The
    # stacked form reads Shape(X); onnxruntime folded it from the declared 1, so batch 2 broke a Conv.
    model = conv_model([{"in": 16, "out": 16}, {"out": 16}], opset=opset, ir_version=6 if opset == 11 else 8)
    for vi in model.graph.value_info:
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    result = onnxstack.compress(model, CompressConfig(slice_dim=8, execution="stacked"))
    out = result.model.graph.output[0].type.tensor_type
    assert not out.HasField("shape") or not out.shape.dim[0].HasField("dim_value")
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 12)).astype(np.float32)
    y = run_ort(result.model, {"input": x})[0]
    assert y.shape == (2, 16, 8, 8)
    np.testing.assert_allclose(y[1:], run_ort(result.model, {"input": x[1:]})[0], rtol=1e-4, atol=1e-4)


# --- numbers: never an internal error, data that names itself --------------------------------------------


def test_degenerate_calibration_data_never_breaks_a_fit():
    """Few, repeated samples and dead channels make the input moments singular."""
    model = conv_model([{"in": 8, "out": 16}, {"out": 16}], hw=(6, 6))
    x = np.zeros((6, 8, 6, 6), np.float32)
    x[:, :2] = np.random.default_rng(0).standard_normal((1, 2, 6, 6))  # 6 copies, 6 of 8 channels dead
    for cfg in (CompressConfig(slice_dim=2, terms=4), CompressConfig(slice_dim=4, terms=2, scale="filter")):
        result = onnxstack.compress(model, cfg, data={"input": x})
        assert all(np.isfinite(e["output_rel_error"]) for e in result.report["layers"])


def test_nan_in_calibration_data_names_the_data_not_a_layer():
    model = conv_model([{"in": 16, "out": 16}])
    feeds = _feeds(model, 10)
    feeds["input"][3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"calibration data for input 'input' holds 1 NaN or Inf value\(s\) in 1 of 10"):
        onnxstack.compress(model, CompressConfig(slice_dim=8), data=feeds)


def test_api_refuses_an_already_compressed_model():
    model = conv_model([{"in": 16, "out": 16}])
    once = onnxstack.compress(model, CompressConfig(slice_dim=8)).model
    with pytest.raises(onnxstack.ModelError, match="already compressed by onnxstack"):
        onnxstack.compress(once, CompressConfig(slice_dim=8))


# --- the search: a ladder with no holes, mixed representations ---------------------------------------------


def test_target_ratio_lands_within_15_percent_from_4_to_100():
    model = conv_model([{"in": 32, "out": 64, "pads": [1, 1, 1, 1]}, {"out": 128, "pads": [1, 1, 1, 1]}], hw=(6, 6))
    feeds = _feeds(model, 48)
    for target in (4, 6, 8, 12, 16, 24, 32, 48, 64, 100):
        report = onnxstack.compress(model, CompressConfig(), data=feeds, target_ratio=target).report
        ratio = report["conv_ratio"]
        assert target / 1.15 <= ratio, (target, ratio)  # never short of the target
        # above it only where that measured less damage, and the report says so
        assert ratio <= target * 1.15 or f"reach {ratio:.1f}x" in report["target_note"], (target, ratio)


def test_the_top_of_the_ladder_takes_wide_slices_and_int4_depthwise():
    # EfficientNet-Lite0's candidates reached 34x: its depthwise convs could only be int8 (a 3x3 filter's
    # scale and bias weigh as much as its weights) and no slice was longer than 64 channels. Here 64x needs
    # both: int8 depthwise and 64-channel slices top out near 46x.
    model = conv_model([{"in": 256, "out": 256, "k": 1}, {"out": 256, "group": 256, "pads": [1, 1, 1, 1]},
                        {"out": 256, "k": 1}], hw=(4, 4))
    report = onnxstack.compress(model, CompressConfig(), data=_feeds(model, 24), target_ratio=64).report
    assert 64 / 1.15 <= report["conv_ratio"] <= 64 * 1.15
    alloc = report["allocation"]
    assert alloc["conv1"]["representation"] == "int4"
    assert all(alloc[n]["representation"] == "binary" and alloc[n]["slice_dim"] > 64 for n in ("conv0", "conv2"))


def test_100x_stores_a_depthwise_conv_binary_a_kernel_a_slice():
    # a 5x5 depthwise conv as int4 takes 100 bits of weights and 64 of scale and bias a channel: two of them
    # beside two 1x1 convs at their smallest exceed the budget of 100x; binary at d = 1 (one kernel a slice,
    # 8-bit indices and 16-bit scales) fits
    dw = {"out": 512, "k": 5, "group": 512, "pads": [2, 2, 2, 2]}
    model = conv_model([{"in": 512, "out": 512, "k": 1}, dw, dw, {"out": 512, "k": 1}], hw=(6, 6))
    result = onnxstack.compress(model, CompressConfig(), data=_feeds(model, 24), target_ratio=100)
    report = result.report
    assert 100 / 1.15 <= report["conv_ratio"] <= 100 * 1.15
    assert "binary" in {report["allocation"][n]["representation"] for n in ("conv1", "conv2")}
    layer = next(e for e in report["layers"] if e["name"] in ("conv1", "conv2") and e["representation"] == "binary")
    assert layer["representation"] == "binary" and layer["slice_dim"] == 1 and layer["fitter"] == "weights"
    ref, got = (run_ort(m, _feeds(model, 4, seed=1))[0] for m in (model, result.model))
    assert np.isfinite(got).all() and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.5


def test_the_grid_reaches_the_cheapest_setting_a_layer_has():
    # the top of the ladder: the fewest bits over every (d, m, k, scale) the grid's rules allow, a whole
    # filter a slice (d = 192, in neither slice-depth list) included, whichever rung it falls on
    from onnxstack.analyse import analyse
    from onnxstack.core import cost
    from onnxstack.search import CODEBOOK_SIZES, MAX_CODEBOOK_BYTES, SLICE_DIMS, TERMS, TOP_SLICE_DIMS, candidate_grid

    model = conv_model([{"in": 192, "out": 96, "k": 1}, {"out": 96, "k": 1}], hw=(4, 4))
    info = analyse(model, CompressConfig())[0]
    grid = candidate_grid(info, CompressConfig())

    def bits(d, m, k, scale):
        return cost.compressed_bits(96, -(-192 // d), d, 1, 1, m, scale, True, k)["total"]

    every = [(d, m, k, sc) for d in (*SLICE_DIMS, *TOP_SLICE_DIMS, 192) if d <= 192 for m in CODEBOOK_SIZES
             if m <= max(2, 96 * -(-192 // d) // 2) and m <= 2 ** d and m * d * d * 8 <= MAX_CODEBOOK_BYTES
             for k in TERMS for sc in ("slice", "filter")]
    assert min(bits(*g) for g in grid) == min(bits(*g) for g in every)


def test_the_search_chooses_the_scale_mode_per_layer_and_the_plan_follows_it():
    # a float16 scale a 16-weight slice is a bit a weight on a 1x1 conv: per-filter scales spend it on terms
    model = conv_model([{"in": 128, "out": 128, "k": 1}, {"out": 128, "k": 1}, {"out": 64, "pads": [1, 1, 1, 1]}],
                       hw=(4, 4))
    report = onnxstack.compress(model, CompressConfig(), data=_feeds(model, 24), target_ratio=32).report
    alloc, plans = report["allocation"], {e["name"]: e for e in report["layers"]}
    binary = [n for n, a in alloc.items() if a["representation"] == "binary"]
    assert binary and all(plans[n]["scale"] == alloc[n]["scale"] for n in binary)
    assert "filter" in {alloc[n]["scale"] for n in binary}
    assert 32 / 1.15 <= report["conv_ratio"] <= 32 * 1.15


def test_a_users_per_layer_scale_mode_is_the_only_one_the_search_tries_there():
    from onnxstack.analyse import analyse
    from onnxstack.config import LayerOverride
    from onnxstack.search import candidate_grid

    model = conv_model([{"in": 64, "out": 64, "k": 1}, {"out": 64, "k": 1}], hw=(4, 4))
    config = CompressConfig(overrides={"conv0": LayerOverride(scale="filter")})
    infos = {i.name: i for i in analyse(model, config)}
    assert {g[3] for g in candidate_grid(infos["conv0"], config)} == {"filter"}
    assert {g[3] for g in candidate_grid(infos["conv1"], config)} == {"slice", "filter"}


def test_search_mixes_int8_where_it_pays_and_says_so():
    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 64, "pads": [1, 1, 1, 1]}], hw=(8, 8))
    result = onnxstack.compress(model, CompressConfig(), data=_feeds(model, 48), target_ratio=4)
    alloc = result.report["allocation"]
    reps = {e["name"]: e["representation"] for e in result.report["layers"]}
    assert "int8" in reps.values()  # 4x is int8's ratio: the cheapest way to keep the outputs
    assert all(alloc[name]["representation"] == rep for name, rep in reps.items() if name in alloc)
    assert all(a["sensitivity"] is not None and a["sensitivity"] > 0 for a in alloc.values())


def _classifier(seed=0, features=256, classes=32):
    """conv 3x3 -> relu -> global average pool -> flatten -> Gemm: the head has one row a sample."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((features, 8, 3, 3)) / 8).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((classes, features)) / 16).astype(np.float32), "fc.w"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("GlobalAveragePool", ["r0"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 8, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_search_measures_damage_on_samples_the_fit_did_not_see(monkeypatch):
    # A classifier head sees one row a sample: 24 samples, 256 inputs. Fitted and measured on the same rows,
    # a binary head looks nearly free (it fits the rows' 24-dimensional span); on rows it did not see, it
    # is not. EfficientNet-Lite0 went to 0-4 % top-1 agreement at 8x on exactly this (its FC binary).
    from onnxstack import calibrate, search
    from onnxstack.analyse import analyse
    from onnxstack.normalise import normalise

    model = normalise(_classifier())
    config = CompressConfig()
    infos = analyse(model, config)
    rng = np.random.default_rng(1)
    feeds = {"input": rng.standard_normal((24, 8, 6, 6)).astype(np.float32)}

    def head_damage():
        c = search.layer_candidates_all(model, infos, feeds, config)
        gain = c.sensitivity["fc"]
        return min(x.damage for x in c.per_layer["fc"] if x.representation == "binary") / gain

    held_out = head_damage()
    monkeypatch.setattr(calibrate, "MIN_HELD_OUT_SAMPLES", 10 ** 6)  # the old behaviour: damage in-sample
    in_sample = head_damage()
    assert held_out > 5 * in_sample


def test_a_head_the_data_cannot_pin_down_gets_its_ridge_from_held_out_rows(monkeypatch):
    # 24 samples for a 256-input head: the final fit tries stronger ridges on 3/4 of the samples, keeps
    # the one the other quarter likes best, says so, and the model does better on samples it never saw
    from onnxstack import calibrate

    model = _classifier()
    rng = np.random.default_rng(1)
    calib = {"input": rng.standard_normal((24, 8, 6, 6)).astype(np.float32)}
    test = {"input": rng.standard_normal((200, 8, 6, 6)).astype(np.float32)}
    ref = run_ort(model, test)[0]

    def unseen_error():
        result = onnxstack.compress(model, CompressConfig(), data=calib)
        out = run_ort(result.model, test)[0]
        notes = {e["name"]: e.get("note") or "" for e in result.report["layers"]}
        return float(np.sum((out - ref) ** 2) / np.sum((ref - ref.mean(0)) ** 2)), notes

    held_out, notes = unseen_error()
    assert "ridge" in notes["fc"] and "held-out rows" in notes["fc"] and "ridge" not in notes["conv0"]
    monkeypatch.setattr(calibrate, "MIN_HELD_OUT_SAMPLES", 10 ** 6)  # every row fitted at the configured ridge
    in_sample, notes = unseen_error()
    assert "ridge" not in notes["fc"]
    assert held_out < 0.95 * in_sample


def test_end_to_end_counts_flips_on_score_outputs_and_squared_error_elsewhere():
    from onnxstack.search import end_to_end

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((10, 5)).astype(np.float32)
    moved = logits.copy()
    moved[:3] = moved[:3, ::-1]  # three rows' argmax changes (their max moves to another column)
    flipped = int(np.sum(moved.argmax(1) != logits.argmax(1)))
    got = end_to_end([{"y": logits[:6]}, {"y": logits[6:]}], [{"y": moved[:6]}, {"y": moved[6:]}])
    assert got["argmax_disagreement"] == pytest.approx(flipped / 10) and flipped > 0
    expect = np.sum((moved - logits) ** 2) / np.sum((logits - logits.mean()) ** 2)
    assert got["output_rel_mse"] == pytest.approx(expect, rel=1e-6)
    assert got["rank"] == (got["argmax_disagreement"], got["output_rel_mse"])
    image = rng.standard_normal((4, 1, 6, 6))  # a dense map: no argmax, squared error alone
    dense = end_to_end([{"y": image}], [{"y": image + 0.1}])
    assert "argmax_disagreement" not in dense and dense["rank"][0] == 0.0 and dense["output_rel_mse"] > 0
    seq = rng.standard_normal((12, 4, 30))  # (T, N, C) symbol scores: argmax over C per step
    assert end_to_end([{"y": seq}], [{"y": seq}])["argmax_disagreement"] == 0.0


def test_choices_try_the_dominant_layer_in_its_other_representations():
    from onnxstack.search import Candidate, Candidates, allocate

    def ladder(scale):  # int8, int4, three binary settings and float, bits and damages in proportion
        return [Candidate(0, 0, 0, 8 * scale, 0.001, "int8"), Candidate(0, 0, 0, 4 * scale, 0.01, "int4"),
                Candidate(16, 256, 4, 4 * scale, 0.012), Candidate(16, 64, 2, 2 * scale, 0.02),
                Candidate(16, 64, 1, scale, 0.05),
                Candidate(0, 0, 0, 32 * scale, 0.0, "float")]

    big = Candidates({"big": ladder(1000), "small": ladder(10)}, fixed_bits=0, total_bits=32 * 1010)
    choices = big.choices(8)
    first = choices[0][1]
    assert choices[0][0] == "least summed damage"
    others = {label: c for label, c in choices[1:]}
    assert others and all(label.startswith("big as ") for label in others)
    assert all(c["big"].representation != first["big"].representation for c in others.values())
    assert all(sum(x.bits for x in c.values()) <= 32 * 1010 / 8 for _, c in choices)  # each within the budget
    even = Candidates({"a": ladder(100), "b": ladder(100), "c": ladder(100), "d": ladder(100), "e": ladder(100)},
                      fixed_bits=0, total_bits=32 * 500)
    assert len(even.choices(8)) == 1  # no layer takes a quarter of the budget: nothing else to build
    # a layer with 30 % of the weights that the allocation made cheap (a classifier's FC, binary at ~1 bit)
    head = [Candidate(0, 0, 0, 8 * 300, 0.001, "int8"), Candidate(0, 0, 0, 4 * 300, 0.002, "int4"),
            Candidate(16, 64, 1, 300, 0.003), Candidate(0, 0, 0, 32 * 300, 0.0, "float")]
    fc = Candidates({"head": head, **{f"conv{i}": ladder(100) for i in range(7)}}, fixed_bits=0, total_bits=32 * 1000)
    first = fc.choices(8)[0][1]
    assert first["head"].representation == "binary" and first["head"].bits < 0.25 * 32 * 1000 / 8
    assert {label for label, _ in fc.choices(8)[1:]} == {"head as int4", "head as int8"}
    # a head beside one small conv: at 6x the int4 head lands at 32 * 310 / (1200 + 320) = 6.5x; as binary the
    # small conv cannot take up the bits it frees (16x), and an allocation landing that far above the target
    # is not offered (the check would keep it for moving the outputs less, and miss the target)
    alone = Candidates({"head": head, "conv": ladder(10)}, fixed_bits=0, total_bits=32 * 310)
    ratio = {t: [32 * 310 / sum(x.bits for x in c.values()) for _, c in alone.choices(t)] for t in (6, 8)}
    assert [label for label, _ in alone.choices(6)] == ["least summed damage"] and ratio[6][0] < 1.15 * 6
    # at 8x the relaxation's answer (the binary head beside a float conv) lands at 16x; the least summed
    # damage among allocations within 15 % of 8x is taken instead (core.allocation.in_window)
    assert 8 <= ratio[8][0] <= 1.15 * 8 and all(r <= 1.15 * 8 for r in ratio[8])
    assert allocate(alone.per_layer, 32 * 310 / 8) != alone.choices(8)[0][1]  # without the window: 16x


def test_allocation_check_keeps_the_alternative_that_moves_the_outputs_least(monkeypatch):
    from onnxstack import pipeline

    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 64, "pads": [1, 1, 1, 1]}], hw=(8, 8))
    feeds = _feeds(model, 32)
    real = pipeline.end_to_end
    calls = []

    def rigged(reference, outputs):  # the last alternative built is declared best, whatever it measures
        got = real(reference, outputs)
        calls.append(got)
        return {**got, "rank": (-len(calls), 0.0)}

    monkeypatch.setattr(pipeline, "end_to_end", rigged)
    real_fit, fitted = pipeline.fit_stage, []

    def counted(model, settings, progress=None):  # the samples each build is fitted on
        fitted.append(len(next(iter(settings.feeds.values()))))
        return real_fit(model, settings, progress)

    monkeypatch.setattr(pipeline, "fit_stage", counted)
    report = onnxstack.compress(model, CompressConfig(), data=feeds, target_ratio=8).report
    check = report["allocation_check"]
    # measured on the held-out quarter (8 of 32 samples), built from the rest; the kept one refitted on all
    assert len(check["tried"]) == len(calls) >= 2 and check["samples"] == 8 and check["held_out"] is True
    assert sum(1 for _ in fitted) == len(calls) + 1 and fitted[-1] == 32 and set(fitted[:-1]) == {24}
    assert [t["kept"] for t in check["tried"]] == [False] * (len(calls) - 1) + [True]
    kept = check["tried"][-1]
    assert report["conv_ratio"] == pytest.approx(kept["conv_ratio"])
    reps = {e["name"]: e.get("representation", "binary") for e in report["layers"]}
    assert all(reps[name] == a["representation"] for name, a in report["allocation"].items() if not a["dense"])
    assert kept["allocation"].split(" as ")[-1] in {a["representation"] for a in report["allocation"].values()}
