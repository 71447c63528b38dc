import numpy as np
import onnx
import pytest

import onnxstack
from onnxstack import CompressConfig
from onnxstack.core.calib import LayerStats, fit_output_aware, im2col_rows, output_size
from onnxstack.core.conv import conv2d, resolve_pads
from onnxstack.core.fit import fit_binary_codebook, from_slices, to_slices

from .models import conv_model, run_ort


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 1], "pads": [1, 0, 2, 1]}, {"dilations": [2, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]}])
def test_im2col_rows_match_conv(attrs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 11, 9)).astype(np.float32)
    w = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    y = conv2d(x, w, **attrs)
    pads = resolve_pads((11, 9), (3, 3), attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1]),
                        attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    ho, wo = output_size((11, 9), (3, 3), attrs.get("strides", [1, 1]), pads, attrs.get("dilations", [1, 1]))
    assert (ho, wo) == y.shape[2:]
    pos = rng.integers(0, ho * wo, (3, 7))
    rows = im2col_rows(x, pos, (3, 3), **attrs)
    expect = y.reshape(3, 4, -1)[np.arange(3)[:, None], :, pos].reshape(-1, 4)
    np.testing.assert_allclose(rows @ w.reshape(4, -1).T, expect, rtol=1e-4, atol=1e-4)


def test_layer_stats_are_centred_moments():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((500, 6)) + 3, rng.standard_normal((500, 2))
    st = LayerStats.empty(6, 2)
    st.add(X[:200], Y[:200])
    st.add(X[200:], Y[200:])
    mx, H, G, my = st.centred()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    np.testing.assert_allclose(H, Xc.T @ Xc, rtol=1e-4, atol=1e-3)  # float32 products of each batch
    np.testing.assert_allclose(G, Xc.T @ Yc, rtol=1e-4, atol=1e-3)


def test_output_aware_fit_beats_weight_space_on_outputs():
    rng = np.random.default_rng(2)
    N, C, k, d, m = 32, 16, 3, 8, 16
    w = rng.standard_normal((N, C, k, k)).astype(np.float32)
    mix = rng.standard_normal((C * k * k, C * k * k)) * 0.3 + np.eye(C * k * k)
    X = rng.standard_normal((4000, C * k * k)) @ mix + 0.5  # correlated, not centred
    Y = X @ w.reshape(N, -1).T
    st = LayerStats.empty(C * k * k, N)
    st.add(X, Y)
    fit, bias = fit_output_aware(w, st, d, m)
    plain = fit_binary_codebook(to_slices(w, d), m)

    def out_err(f, b):
        w_hat = from_slices(f.decode(), C, (k, k)).reshape(N, -1)
        return np.linalg.norm(X @ w_hat.T + b - Y) / np.linalg.norm(Y - Y.mean(0))

    assert out_err(fit, bias) < 0.95 * out_err(plain, 0.0)


def test_compress_with_data_improves_outputs():
    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 32, "pads": [1, 1, 1, 1], "bias": False},
                        {"out": 16, "k": 1}], hw=(10, 10))
    rng = np.random.default_rng(3)
    calib = {"input": np.abs(rng.standard_normal((96, 16, 10, 10))).astype(np.float32)}
    test = {"input": np.abs(rng.standard_normal((32, 16, 10, 10))).astype(np.float32)}
    ref = run_ort(model, test)[0]
    cfg = CompressConfig(slice_dim=8)
    plain = onnxstack.compress(model, cfg)
    calibrated = onnxstack.compress(model, cfg, data=calib)
    onnx.checker.check_model(calibrated.model, full_check=True)

    def err(r):
        return np.linalg.norm(run_ort(r.model, test)[0] - ref) / np.linalg.norm(ref)

    assert err(calibrated) < 0.7 * err(plain)
    layer1 = calibrated.report["layers"][1]
    assert layer1["bits_by_part"]["bias"] == 32 * 32  # the bias-free layer now stores a corrected bias
    names = {t.name for t in calibrated.model.graph.initializer}
    assert "conv1.weight.bias" in names and "conv0.bias" not in names


def _small():
    model = conv_model([{"in": 16, "out": 32, "pads": [1, 1, 1, 1]}, {"out": 32, "pads": [1, 1, 1, 1]}], hw=(8, 8))
    rng = np.random.default_rng(4)
    return model, {"input": np.abs(rng.standard_normal((48, 16, 8, 8))).astype(np.float32)}


@pytest.mark.parametrize("target", [8.0, 20.0])
def test_target_ratio_is_reached(target):
    model, calib = _small()
    result = onnxstack.compress(model, CompressConfig(), data=calib, target_ratio=target)
    assert result.report["conv_ratio"] >= target
    alloc = result.report["allocation"]
    assert set(alloc) == {"conv0", "conv1"}
    chosen = {e["name"]: e for e in result.report["layers"]}
    for name, a in alloc.items():
        assert chosen[name].get("representation", "binary") == a["representation"] or a["dense"]
        if not a["dense"] and a["representation"] == "binary":
            assert (chosen[name]["slice_dim"], chosen[name]["codebook_size"], chosen[name]["terms"]) == \
                (a["slice_dim"], a["codebook_size"], a["terms"])


def test_target_ratio_needs_data_and_reachable():
    model, calib = _small()
    with pytest.raises(onnxstack.ConfigError, match="needs calibration data"):
        onnxstack.compress(model, target_ratio=10)
    with pytest.raises(onnxstack.ConfigError, match="lower the target|out of reach"):
        onnxstack.compress(model, data=calib, target_ratio=1e6)


def test_max_drop_without_labels_uses_agreement(monkeypatch):
    """The search on a known drop curve: agreement falls by (conv ratio / 2) points, so a 20-point limit
    must pass every ratio up to ~40x and reject every one above."""
    import json

    from onnxstack import search

    model, calib = _small()

    def predict(m, feeds):
        pred = np.zeros(len(next(iter(feeds.values()))), np.int64)
        meta = {p.key: p.value for p in m.metadata_props}
        if "onnxstack.report" in meta:  # a compressed try: disagree on conv_ratio / 2 percent of samples
            ratio = json.loads(meta["onnxstack.report"])["conv_ratio"]
            pred[: int(round(len(pred) * ratio / 200))] = 1
        return pred

    monkeypatch.setattr(search, "predict_top1", predict)
    limit = 20.0
    result = onnxstack.compress(model, CompressConfig(), data=calib, max_drop=limit)
    search_log = result.report["search"]
    assert search_log and all(s["measure"] == "top-1 agreement" for s in search_log)
    passed = [s for s in search_log if s["drop_points"] <= limit]
    failed = [s for s in search_log if s["drop_points"] > limit]
    assert passed and failed  # the search had to reject some ratio
    chosen = result.report["target_ratio"]
    assert chosen == max(s["target_ratio"] for s in passed)
    assert all(s["target_ratio"] > chosen for s in failed)  # every ratio tried above it failed
    assert result.report["conv_ratio"] >= chosen / 1.15


def test_held_out_rows_choose_a_stronger_ridge_where_the_data_cannot_pin_a_layer_down():
    # a linear layer whose current inputs carry upstream error (x + noise in, the original x W out); 48 rows
    # for 256 weights a filter: a small ridge lets W* interpolate the noise of the rows it is fitted on
    from onnxstack.core.calib import RIDGE_STEPS, held_out_damp

    def ridge_target(stats, w, damp):  # the float fit: W* = W + (H + lam I)^-1 (G - H W), its bias
        mx, H, G, my = stats.centred()
        lam = damp * np.mean(np.diag(H))
        wstar = w + np.linalg.solve(H + lam * np.eye(len(H)), G - H @ w.T).T
        return wstar, my - wstar @ mx

    rng = np.random.default_rng(7)
    K, N = 256, 32
    w = rng.standard_normal((N, K)) / np.sqrt(K)
    mix = rng.standard_normal((K, K)) / np.sqrt(K)  # correlated features

    def rows(n):
        x = rng.standard_normal((n, K)) @ mix
        s = LayerStats.empty(K, w.shape[0])
        s.add(x + 0.3 * rng.standard_normal(x.shape), x @ w.T)
        return s
    fit, held = rows(48), rows(16)
    damp = held_out_damp(lambda d: ridge_target(fit, w, d), fit, held, 0.01)
    assert damp > 0.01 and any(np.isclose(damp, 0.01 * step) for step in RIDGE_STEPS)
    err = lambda d: held.relative_error(*ridge_target(fit, w, d))  # noqa: E731
    assert err(damp) < 0.8 * err(0.01)
    # enough rows (4 a weight): the configured ridge, no search
    many = rows(4 * K)
    assert held_out_damp(lambda d: ridge_target(many, w, d), many, held, 0.01) == 0.01
    # merged stats are the stats of all the rows
    sums = fit.sxx + held.sxx
    both = fit.absorb(held)
    assert both is fit and both.n == 64 and np.allclose(both.sxx, sums)


def test_the_binary_fits_ridge_pulls_toward_the_original_weight_not_toward_zero():
    # 40 rows for 144 weights a filter: most input directions are unseen. W* keeps the original weight in
    # them (without the prior it is zeroed there), and both the least-squares target and the binary fit
    # made from it answer rows the fit never saw better
    from onnxstack.core.calib import OutputMetric

    rng = np.random.default_rng(3)
    N, C, k, d, m = 16, 16, 3, 4, 64
    K = C * k * k
    w = rng.standard_normal((N, C, k, k)).astype(np.float32)
    mix = rng.standard_normal((K, K)) / np.sqrt(K) + np.eye(K)

    def rows(n):
        x = rng.standard_normal((n, K)) @ mix
        s = LayerStats.empty(K, N)
        s.add(x, x @ w.reshape(N, -1).T)
        return s
    fit, held = rows(40), rows(400)
    toward_w = OutputMetric.build(fit, N, C, d, (k, k), 0.01, prior=w)
    toward_0 = OutputMetric.build(fit, N, C, d, (k, k), 0.01)
    w2 = w.reshape(N, -1)
    assert np.linalg.norm(toward_w.Wstar - w2) < 1e-3 * np.linalg.norm(w2)  # inputs are the original: W* = W
    assert np.linalg.norm(toward_0.Wstar - w2) > 0.5 * np.linalg.norm(w2)  # zeroed where the rows say nothing
    zero_bias = np.zeros(N)
    assert held.relative_error(toward_w.Wstar, zero_bias) < 0.1 * held.relative_error(toward_0.Wstar, zero_bias)
    binary = lambda metric: fit_output_aware(w, fit, d, m, terms=2, metric=metric)  # noqa: E731
    errors = [held.relative_error(from_slices(f.decode(), C, (k, k)).reshape(N, -1), b)
              for f, b in (binary(toward_w), binary(toward_0))]
    assert errors[0] < 0.85 * errors[1]  # 0.53 against 0.73 when written
