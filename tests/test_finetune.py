"""Fine-tuning: write-back round trip, the loop lowers the distillation loss, checkpoints resume exactly,
the CLI command, and DistributedDataParallel with 2 CPU processes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxstack  # noqa: E402
from onnxstack.errors import ConfigError, OnnxstackError  # noqa: E402
from onnxstack.torch_bridge import FinetuneConfig, build_module, finetune, write_back  # noqa: E402

from .models import run_ort  # noqa: E402

torch.set_num_threads(1)


def classifier(seed=0, c=4, hw=6, classes=5):
    """Conv-Relu-Conv-Relu-Flatten-Gemm: random weights whose argmax still varies between inputs."""
    rng = np.random.default_rng(seed)

    def w(*s):
        return numpy_helper.from_array((rng.standard_normal(s) * np.sqrt(2 / np.prod(s[1:]))).astype(np.float32))

    inits = [w(8, c, 3, 3), w(16, 8, 3, 3), w(classes, 16 * hw * hw)]
    for t, name in zip(inits, ("c0.weight", "c1.weight", "fc.weight")):
        t.name = name
    inits += [numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), f"{k}.bias")
              for n, k in ((8, "c0"), (16, "c1"), (classes, "fc"))]
    nodes = [
        helper.make_node("Conv", ["x", "c0.weight", "c0.bias"], ["h0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("Conv", ["r0", "c1.weight", "c1.bias"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, hw, hw])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def models():
    teacher = classifier()
    # the fully connected layer `fc` stays dense here: the tests below train dense layers beside compressed ones
    compressed = onnxstack.compress(teacher, onnxstack.CompressConfig(slice_dim=4, codebook_size=2, skip=("Gemm_5",))).model
    x = np.random.default_rng(1).standard_normal((240, 4, 6, 6)).astype(np.float32)
    labels = run_ort(teacher, {"x": x})[0].argmax(1)
    return teacher, compressed, x, labels


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_initializers(a, b):
    ia, ib = initializers(a), initializers(b)
    assert ia.keys() == ib.keys()
    for k in ia:
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


# --- write-back ------------------------------------------------------------------------------------


def test_write_back_without_training_is_identity(models):
    _, compressed, x, _ = models
    out = write_back(compressed, build_module(compressed))
    assert_same_initializers(out, compressed)
    np.testing.assert_array_equal(run_ort(out, {"x": x})[0], run_ort(compressed, {"x": x})[0])


def test_write_back_after_a_step(models):
    _, compressed, x, _ = models
    module = build_module(compressed, latent_init=0.01)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    module(torch.from_numpy(x[:16]))[0].square().mean().backward()
    opt.step()
    out = write_back(compressed, module, {"note": "one step"})
    onnx.checker.check_model(out, full_check=True)
    changed = [k for k, v in initializers(out).items() if not np.array_equal(v, initializers(compressed)[k])]
    assert any(k.endswith(".codebook") for k in changed) and any(k.endswith(".scales") for k in changed)
    assert "fc.weight" in changed
    got = run_ort(out, {"x": x})[0]
    assert not np.allclose(got, run_ort(compressed, {"x": x})[0])
    np.testing.assert_allclose(got, module(torch.from_numpy(x))[0].detach().numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads({p.key: p.value for p in out.metadata_props}["onnxstack.finetune"]) == {"note": "one step"}


# --- the loop ----------------------------------------------------------------------------------------


def test_finetune_lowers_distillation_loss(models):
    teacher, compressed, x, labels = models
    config = FinetuneConfig(epochs=3, batch_size=24, lr=3e-3, labels_weight=0.5, feature_weight=0.1, seed=0)
    result = finetune(compressed, teacher, (x, labels), config=config)
    first, best = result.history[0], result.best
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert best["kl"] < 0.7 * first["kl"] and best["accuracy"] >= first["accuracy"]
    assert result.metric == "accuracy" and result.best_epoch > 0
    onnx.checker.check_model(result.model, full_check=True)
    assert result.onnx_metrics["accuracy"] == best["accuracy"]  # onnxruntime scores the file as the loop did
    assert {o.name for o in result.model.graph.output} == {"logits"}


def test_finetune_without_labels_scores_agreement(models):
    teacher, compressed, x, _ = models
    config = FinetuneConfig(epochs=1, batch_size=48, train="compressed", reassign_every=1, augment_shift=1,
                            augment_flip=True)
    result = finetune(compressed, teacher, (x, None), val=(x[:40], None), config=config)
    assert result.metric == "agreement" and "accuracy" not in result.history[0]
    assert result.history[0]["samples"] == 40
    fixed = {"fc.weight", "fc.bias"}
    after = initializers(result.model)
    for k in fixed:  # --train compressed leaves the dense layers alone
        np.testing.assert_array_equal(after[k], initializers(compressed)[k])


class Interrupt(Exception):
    pass


def _stop_at(epoch, step=None):
    def callback(event, info):
        if event == "epoch_end" and step is None and info["epoch"] == epoch:
            raise Interrupt
        if event == "step" and step is not None and info["epoch"] == epoch and info["step"] == step:
            raise Interrupt
    return callback


@pytest.mark.parametrize("step", [None, 3], ids=["after-epoch", "mid-epoch"])
def test_checkpoint_resume_is_exact(models, tmp_path, step):
    teacher, compressed, x, labels = models
    config = FinetuneConfig(epochs=2, batch_size=48, lr=3e-3, checkpoint_minutes=1e-9)
    whole = finetune(compressed, teacher, (x, labels), config=config)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        finetune(compressed, teacher, (x, labels), config=config, checkpoint=ckpt, callback=_stop_at(1, step))
    assert ckpt.exists()
    resumed = finetune(compressed, teacher, (x, labels), config=config, checkpoint=ckpt, resume=True)
    assert_same_initializers(resumed.model, whole.model)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]


def test_resume_refuses_another_model(models, tmp_path):
    teacher, compressed, x, labels = models
    ckpt = tmp_path / "run.ckpt"
    finetune(compressed, teacher, (x, labels), config=FinetuneConfig(epochs=1, batch_size=120), checkpoint=ckpt)
    other = onnxstack.compress(teacher, onnxstack.CompressConfig(slice_dim=4, codebook_size=4)).model
    with pytest.raises(OnnxstackError, match="checkpoint of another compressed model"):
        finetune(other, teacher, (x, labels), config=FinetuneConfig(epochs=1), checkpoint=ckpt, resume=True)


def test_checkpoint_is_written_atomically_and_damage_is_refused(models, tmp_path):
    from onnxstack.torch_bridge.checkpoint import fingerprint, load_checkpoint, save_checkpoint

    _, compressed, _, _ = models
    student = build_module(compressed)
    optimizer = torch.optim.AdamW(student.parameters())
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, fingerprint=fingerprint(compressed), config={}, student=student, optimizer=optimizer,
                    history=[{"epoch": 0}], best=None, position={"epoch": 0, "step": 0})
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left beside it
    ckpt = load_checkpoint(path, device=torch.device("cpu"), fingerprint=fingerprint(compressed))
    assert ckpt["history"] == [{"epoch": 0}] and ckpt["position"] == {"epoch": 0, "step": 0}
    with pytest.raises(OnnxstackError, match="checkpoint of another compressed model"):
        load_checkpoint(path, device=torch.device("cpu"), fingerprint="0" * 16)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OnnxstackError, match="not a readable checkpoint"):
        load_checkpoint(path, device=torch.device("cpu"), fingerprint=fingerprint(compressed))
    with pytest.raises(OnnxstackError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.ckpt", device=torch.device("cpu"), fingerprint="")


def test_schedule_warms_up_then_decays_to_zero():
    from onnxstack.torch_bridge.optim import lr_factor

    warm = 0.1
    assert lr_factor(0.0, warm) == pytest.approx(1e-3 / (warm + 1e-3))
    assert lr_factor(warm, warm) == pytest.approx(1.0)
    assert lr_factor(1.0, warm) == pytest.approx(0.0, abs=1e-12) and lr_factor(2.0, warm) == lr_factor(1.0, warm)
    rates = [lr_factor(p, warm) for p in np.linspace(warm, 1, 20)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_scoreboard_keeps_the_best_epoch():
    from onnxstack.torch_bridge.evaluate import Scoreboard, heldout_record

    module = torch.nn.Linear(2, 2)
    board = Scoreboard()
    t = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)  # teacher: classes 1, 0, 1
    labels = np.array([1, 0, 0])
    board.add(heldout_record(0, t[:, ::-1].copy(), t, labels), module)  # agreement 0, accuracy 1/3
    with torch.no_grad():
        module.weight.fill_(7.0)
    board.add(heldout_record(1, t, t, labels), module)  # agreement 1, accuracy 2/3
    with torch.no_grad():
        module.weight.fill_(9.0)  # the kept state is a copy
    board.add(heldout_record(2, t * 0.5, t, labels, partial=True), module)  # same accuracy, larger kl
    r = board.history[1]
    assert r["agreement"] == 1.0 and r["accuracy"] == pytest.approx(2 / 3) and r["samples"] == 3 and r["kl"] < 1e-6
    assert board.history[2]["partial"] and board.best["epoch"] == 1
    assert torch.equal(board.best["state"]["weight"], torch.full((2, 2), 7.0))


def test_time_limit_stops_early(models):
    teacher, compressed, x, labels = models
    result = finetune(compressed, teacher, (x, labels), config=FinetuneConfig(epochs=50, batch_size=8, max_minutes=2e-3))
    assert len(result.history) < 51  # stopped long before 50 epochs
    assert not any(r.get("partial") for r in result.history[:-1])


def test_bad_inputs(models):
    teacher, compressed, x, _ = models
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ConfigError, match="device"):
        FinetuneConfig(device="tpu")
    with pytest.raises(onnxstack.DataError, match="no data for model input"):
        finetune(compressed, teacher, ({"y": x}, None), config=FinetuneConfig(epochs=1))
    with pytest.raises(onnxstack.ModelError, match="no StackedBinaryConv"):
        finetune(teacher, teacher, (x, None), config=FinetuneConfig(epochs=1))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            finetune(compressed, teacher, (x, None), config=FinetuneConfig(epochs=1, device="cuda"))


# --- CLI and DDP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    teacher, compressed, x, labels = models
    d = tmp_path_factory.mktemp("ft")
    onnx.save(teacher, d / "m.onnx")
    onnx.save(compressed, d / "m.stacked.onnx")
    np.savez(d / "train.npz", x=x, labels=labels)
    return d


def test_cli_finetune(files):
    from click.testing import CliRunner

    from onnxstack.cli.finetune_cmd import finetune as command

    args = ["m.stacked.onnx", "--teacher", "m.onnx", "--data", "train.npz", "--epochs", "1", "-b", "48",
            "--labels-weight", "1"]
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(files)
    try:
        res = runner.invoke(command, args)
        assert res.exit_code == 0, res.output
        assert "wrote m.stacked.ft.onnx" in res.output and "accuracy" in res.output
        assert "held-out agreement" not in res.output  # no per-epoch line besides the table
        assert sum(line.split()[:1] == ["1"] for line in res.stdout.splitlines()) == 1  # epoch 1: one table row
        assert (files / "m.stacked.ft.onnx").exists() and not (files / "m.stacked.ft.onnx.ckpt").exists()
        onnx.checker.check_model(onnx.load(files / "m.stacked.ft.onnx"), full_check=True)
        res = runner.invoke(command, args)
        assert res.exit_code == 1 and "exists" in res.output
        res = runner.invoke(command, args + ["-o", "other.onnx", "--resume"])
        assert res.exit_code == 1 and "no checkpoint" in res.output
        res = runner.invoke(command, ["m.onnx", "--teacher", "m.onnx", "--data", "train.npz", "-o", "x.onnx"])
        assert res.exit_code == 1 and "no StackedBinaryConv" in res.output
    finally:
        os.chdir(cwd)


def test_distributed_two_cpu_processes(files):
    script = files / "ddp.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from onnxstack.cli.finetune_cmd import finetune
        sys.argv = ["finetune", "m.stacked.onnx", "--teacher", "m.onnx", "--data", "train.npz", "-o", "ddp.onnx",
                    "--epochs", "2", "-b", "48", "--overwrite"]
        finetune(standalone_mode=False)
        with open(f"rank{os.environ['RANK']}.txt", "w") as f:
            import torch.distributed as td
            f.write(os.environ["WORLD_SIZE"])
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=files, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (files / "rank0.txt").read_text() == "2" and (files / "rank1.txt").read_text() == "2"
    out = onnx.load(files / "ddp.onnx")
    onnx.checker.check_model(out, full_check=True)
    history = json.loads({p.key: p.value for p in out.metadata_props}["onnxstack.finetune"])["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2] and history[-1]["kl"] < history[0]["kl"]
    assert proc.stdout.count("wrote ddp.onnx") == 1  # rank 0 alone writes


def test_cli_defaults_match_the_config():
    from onnxstack.cli.finetune_cmd import finetune as command

    defaults = {p.name: p.default for p in command.params}
    config = FinetuneConfig()
    for name in ("epochs", "lr", "latent_lr", "batch_size", "labels_weight", "temperature", "feature_weight",
                 "reassign_every", "augment_shift", "val_fraction", "seed"):
        assert defaults[name] == getattr(config, name), name
    assert defaults["train_set"] == config.train and defaults["device"] == config.device


def test_compress_with_finetune_epochs(files):
    """`onnxstack compress --data D --finetune-epochs E`: one step; the fine-tuned values are what is written."""
    from click.testing import CliRunner

    from onnxstack.cli import main

    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(files)
    try:
        base = ["compress", "m.onnx", "-d", "4", "-m", "2", "--data", "train.npz", "-q", "--report"]
        res = runner.invoke(main, [*base, "plain.json", "-o", "plain.onnx"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, [*base, "ft.json", "-o", "ft.onnx", "--finetune-epochs", "2"])
        assert res.exit_code == 0, res.output
        plain, tuned = initializers(onnx.load("plain.onnx")), initializers(onnx.load("ft.onnx"))
        assert plain.keys() == tuned.keys()
        onnx.checker.check_model(onnx.load("ft.onnx"), full_check=True)
        full = json.loads((files / "ft.json").read_text())
        assert full["compressed_bytes"] == os.path.getsize("ft.onnx")  # the written, fine-tuned file
        report = full["finetune"]
        assert report["epochs"] == 2 and [r["epoch"] for r in report["history"]] == [0, 1, 2]
        best = report["history"][report["best_epoch"]]
        assert report["written_model"]["accuracy"] == pytest.approx(best["accuracy"])  # the kept epoch is written
        changed = any(not np.array_equal(v, tuned[k]) for k, v in plain.items())
        assert changed == (report["best_epoch"] > 0)  # epoch 0 kept: the calibrated values, unchanged
        res = runner.invoke(main, ["compress", "m.onnx", "-o", "x.onnx", "--finetune-epochs", "1"])
        assert res.exit_code == 2 and "needs training inputs" in res.output and not os.path.exists("x.onnx")
    finally:
        os.chdir(cwd)
