"""Train the bundled sample CNNs and export them, BatchNorm folded, to ONNX.

Produces, under --out-dir (default: sample_models/ in the repository):

* ``mnist_cnn.onnx``   CNN on MNIST (8,000 train / 2,000 test images); convs 32-64-128-128 and a global
  average pool (an earlier 16-32-64 one had 23k conv weights: its biases alone were half of what
  1/100 of its conv bits allows, so no setting could reach 100x, the bar of the fine-tuning issue)
* ``fashion_cnn.onnx`` VGG-style CNN on Fashion-MNIST (60,000 / 10,000)
* ``data/{mnist,fashion}_test.npz``  2,000 test images each (``input``, ``labels``)
* ``data/{mnist,fashion}_calib.npz`` 1,000 training images each, for calibration
* ``train_log.json``   accuracies, split sizes, timings and library versions

The ONNX graphs are written with onnx.helper (opset 17, IR version 8) and hold only
Conv (with bias), Relu, MaxPool, Flatten and Gemm nodes. Inputs are float32
``input`` [batch, 1, 28, 28] with pixel values x/255; outputs are ``logits`` [batch, 10].

Usage (from the repository root; about 13 minutes on 2 otherwise idle CPU cores)::

    python scripts/train_samples.py [--data-dir ../shared/data] [--out-dir sample_models] [--seed 0]
"""

import argparse
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from sklearn.model_selection import train_test_split
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
N_TEST_FILE = 2000
N_CALIB = 1000

# name -> data file, test split size, channel plan ("M" = MaxPool 2x2), head, training settings
MODELS = {
    "mnist_cnn": dict(data="mnist10k.npz", short="mnist", test_size=2000,
                      plan=[32, "M", 64, "M", 128, 128], head="gap", epochs=15,
                      batch_size=64, lr=4e-3, shift=2, flip=False),
    "fashion_cnn": dict(data="fashion_mnist70k.npz", short="fashion", test_size=10000,
                        plan=[32, "M", 64, "M", 128, 128, "M"], head="flatten", epochs=8,
                        batch_size=128, lr=3e-3, shift=2, flip=True),
}


def build_model(plan, head):
    """Build an nn.Sequential of Conv-BN-ReLU blocks and MaxPools, plus a classifier.

    ``head="gap"``: GlobalAveragePool-Flatten-Linear(->10);
    ``head="flatten"``: Flatten-Linear(->128)-ReLU-Linear(->10).
    """
    layers, channels, size, n_conv, n_pool = OrderedDict(), 1, 28, 0, 0
    for item in plan:
        if item == "M":
            n_pool += 1
            layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
            size //= 2
            continue
        n_conv += 1
        layers[f"conv{n_conv}"] = nn.Conv2d(channels, item, 3, padding=1, bias=False)
        layers[f"bn{n_conv}"] = nn.BatchNorm2d(item)
        layers[f"relu{n_conv}"] = nn.ReLU()
        channels = item
    if head == "gap":
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc1"] = nn.Linear(channels, 10)
    else:
        layers["flatten"] = nn.Flatten()
        layers["fc1"] = nn.Linear(channels * size * size, 128)
        layers["relu_fc1"] = nn.ReLU()
        layers["fc2"] = nn.Linear(128, 10)
    return nn.Sequential(layers)


def load_splits(path, test_size, seed):
    """Load an npz; return its seeded stratified split (x_train, x_test, y_train, y_test).

    Images become float32 NCHW x/255, labels int64.
    """
    data = np.load(path)
    images = (data["images"].astype(np.float32) / 255.0)[:, None]
    labels = data["labels"].astype(np.int64)
    return train_test_split(images, labels, test_size=test_size, stratify=labels,
                            random_state=seed)


def stratified_subset(x, y, n, seed):
    """Return a seeded, stratified subset of n samples of (x, y)."""
    if n >= len(y):
        return x, y
    _, x_sub, _, y_sub = train_test_split(x, y, test_size=n, stratify=y, random_state=seed)
    return x_sub, y_sub


def augment(x, gen, shift, flip):
    """Randomly translate each image by up to ``shift`` pixels (zero padded) and flip it."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def predict(model, x, batch_size=1000):
    """Return the eval-mode logits of ``model`` on numpy images ``x`` as a numpy array."""
    model.eval()
    batches = (torch.from_numpy(x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    out = [model(b.contiguous(memory_format=torch.channels_last)) for b in batches]
    return torch.cat(out).numpy()


def train(model, x_train, y_train, x_test, y_test, cfg, seed):
    """Train with AdamW and a one-cycle schedule; print per-epoch loss, time and test accuracy."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = (len(yt) + cfg["batch_size"] - 1) // cfg["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"],
                                                total_steps=cfg["epochs"] * steps)
    model.to(memory_format=torch.channels_last)
    start = time.time()
    for epoch in range(1, cfg["epochs"] + 1):
        t0, total_loss = time.time(), 0.0
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(steps):
            idx = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            xb = augment(xt[idx], gen, cfg["shift"], cfg["flip"])
            loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)),
                                   yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
        acc = (predict(model, x_test).argmax(1) == y_test).mean()
        print(f"  epoch {epoch:2d}/{cfg['epochs']}  loss {total_loss / steps:.4f}  "
              f"test acc {acc:.4f}  {time.time() - t0:.1f}s", flush=True)
    return time.time() - start


def fold_bn(conv, bn):
    """Return (weight, bias) numpy arrays of ``conv`` with eval-mode ``bn`` folded in."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach().numpy(), bias.detach().numpy()


def export_onnx(model, path, graph_name):
    """Write ``model`` (an nn.Sequential from build_model) as a BN-free ONNX graph."""
    nodes, inits, cur = [], [], "input"
    layers = list(model.named_children())
    for i, (name, layer) in enumerate(layers):
        out = "logits" if i == len(layers) - 1 else name
        if isinstance(layer, nn.Conv2d):
            weight, bias = fold_bn(layer, layers[i + 1][1])
            inits += [numpy_helper.from_array(weight, f"{name}.weight"),
                      numpy_helper.from_array(bias, f"{name}.bias")]
            nodes.append(helper.make_node("Conv", [cur, f"{name}.weight", f"{name}.bias"], [out],
                                          name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        elif isinstance(layer, nn.BatchNorm2d):
            continue  # folded into the preceding Conv
        elif isinstance(layer, nn.ReLU):
            nodes.append(helper.make_node("Relu", [cur], [out], name=name))
        elif isinstance(layer, nn.MaxPool2d):
            nodes.append(helper.make_node("MaxPool", [cur], [out], name=name,
                                          kernel_shape=[2, 2], strides=[2, 2]))
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            nodes.append(helper.make_node("GlobalAveragePool", [cur], [out], name=name))
        elif isinstance(layer, nn.Flatten):
            nodes.append(helper.make_node("Flatten", [cur], [out], name=name, axis=1))
        elif isinstance(layer, nn.Linear):
            inits += [numpy_helper.from_array(layer.weight.detach().numpy(), f"{name}.weight"),
                      numpy_helper.from_array(layer.bias.detach().numpy(), f"{name}.bias")]
            nodes.append(helper.make_node("Gemm", [cur, f"{name}.weight", f"{name}.bias"], [out],
                                          name=name, transB=1))
        else:
            raise TypeError(f"cannot export layer {name}: {type(layer).__name__}")
        cur = out
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxstack-train-samples", ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return " ".join(n.op_type for n in nodes)


def save_npz(path, x, y):
    """Save images and labels in the bundled test-data format; return the size in bytes."""
    np.savez_compressed(path, input=x.astype(np.float32), labels=y.astype(np.int64))
    return path.stat().st_size


def run_model(name, cfg, data_dir, out_dir, seed):
    """Train, export, verify and save the data files of one sample model; return its log."""
    print(f"== {name}", flush=True)
    x_train, x_test, y_train, y_test = load_splits(data_dir / cfg["data"], cfg["test_size"], seed)
    torch.manual_seed(seed)
    model = build_model(cfg["plan"], cfg["head"])
    seconds = train(model, x_train, y_train, x_test, y_test, cfg, seed)

    onnx_path = out_dir / f"{name}.onnx"
    ops = export_onnx(model, onnx_path, name)
    torch_logits = predict(model, x_test)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    print(f"  torch acc {torch_acc:.4f}  onnxruntime acc {ort_acc:.4f}  max |diff| {max_diff:.2e}")
    if max_diff > 1e-4 or ort_acc != torch_acc:
        raise RuntimeError(f"{name}: onnxruntime does not match torch")

    x_file, y_file = stratified_subset(x_test, y_test, N_TEST_FILE, seed)
    x_calib, y_calib = stratified_subset(x_train, y_train, N_CALIB, seed)
    sizes = {f"{name}.onnx": onnx_path.stat().st_size}
    for kind, x, y in [("test", x_file, y_file), ("calib", x_calib, y_calib)]:
        rel = f"data/{cfg['short']}_{kind}.npz"
        sizes[rel] = save_npz(out_dir / rel, x, y)
    file_logits = session.run(["logits"], {"input": x_file})[0]
    return {
        "test_accuracy": ort_acc,
        "test_accuracy_torch": torch_acc,
        "test_file_accuracy": float((file_logits.argmax(1) == y_file).mean()),
        "max_abs_logit_diff_vs_torch": max_diff,
        "train_size": len(y_train), "test_size": len(y_test),
        "test_file_size": len(y_file), "calib_size": len(y_calib),
        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "max_lr": cfg["lr"],
        "seed": seed, "train_seconds": round(seconds, 1),
        "onnx_ops": ops, "file_bytes": sizes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "sample_models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(MODELS), help="train just this model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    (args.out_dir / "data").mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    versions = {"torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__, "numpy": np.__version__}
    for name, cfg in MODELS.items():
        if args.only in (None, name):
            log[name] = {**run_model(name, cfg, args.data_dir, args.out_dir, args.seed), "versions": versions,
                         "threads": args.threads}
    log = {name: log[name] for name in MODELS if name in log}  # each model records the versions it was made with
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
