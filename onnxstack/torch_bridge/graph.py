"""An ONNX graph as a torch nn.Module that interprets its nodes in order.

    module = build_module("model.stacked.onnx")       # or a ModelProto
    logits, = module(torch.from_numpy(x))             # any batch size
    arrays = module.stored_tensors()                   # initializer name -> array, stored dtype

Initializers become three kinds of state:
  - float initializers that feed the weights of Conv, ConvTranspose, Gemm, MatMul,
    BatchNormalization (scale, B), PRelu or the scale of DequantizeLinear (integer layers: their integers
    stay frozen buffers): nn.Parameters in `params`, keyed by a sanitised name;
  - each StackedBinaryConv node: a StackedBinaryConv2d layer in `layers` (its codebook, indices,
    scales and bias; tensors shared by several nodes are shared Parameters);
  - everything else (BatchNorm statistics, constants, shapes): non-trainable buffers.
Every op the graph uses is checked when the module is built; unknown ones raise an error that names
them all. The default-domain opset decides which attribute/input form of an op applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import numpy_helper
from torch import nn

from .. import op as sbc
from ..errors import ModelError
from ..load import load_model
from .layers import StackedBinaryConv2d
from .ops import OPS, UnsupportedAttribute

# op type -> input positions whose float initializers are trainable parameters
PARAM_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "PRelu": (1,), "DequantizeLinear": (1,),
}
DEFAULT_DOMAINS = ("", "ai.onnx")


class UnsupportedOpError(ModelError):
    """The graph uses operators (or attribute values) the torch bridge does not implement."""


@dataclass
class Node:
    """One graph node with decoded attributes (bytes -> str, tensors -> torch)."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    opset: int
    attrs: dict = field(default_factory=dict)


class OnnxModule(nn.Module):
    """forward(*inputs, outputs=None) -> tuple of the graph outputs (or of the named values)."""

    def __init__(self, model: onnx.ModelProto, *, latent_init: float = 0.5):
        super().__init__()
        model = _inline_other_functions(model)
        graph = model.graph
        self.opset = _default_opset(model)
        inits = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self.output_names = [o.name for o in graph.output]
        self.nodes = [_node(n, i, self.opset) for i, n in enumerate(graph.node)]
        _check_supported(graph, self.nodes)
        self.params = nn.ParameterDict()
        self.layers = nn.ModuleDict()
        self.param_names: dict[str, str] = {}  # initializer name -> key in params
        self.layer_names: dict[str, str] = {}  # node output -> key in layers
        self.layer_tensors: dict[str, dict[str, str]] = {}  # key in layers -> role -> initializer name
        self._buffers_by_name: dict[str, str] = {}  # initializer / Constant output -> buffer attribute
        shared: dict[str, torch.Tensor] = {}
        for node in self.nodes:
            if node.op_type == sbc.OP_TYPE:
                self._add_layer(node, inits, shared, latent_init)
        trainable = _param_initializers(self.nodes, inits)
        for name, tensor in inits.items():
            if name in trainable:
                key = _unique_key(name, self.params)
                self.params[key] = shared[name] if name in shared else nn.Parameter(_to_torch(numpy_helper.to_array(tensor)))
                self.param_names[name] = key
            elif name not in shared:
                self._add_buffer(name, _to_torch(numpy_helper.to_array(tensor)))
        self._dtypes = {name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for name, t in inits.items()}
        for node in self.nodes:  # Constant nodes become buffers, so they move with .to(device)
            if node.op_type == "Constant":
                self._add_buffer(node.outputs[0], _constant_value(node))

    # --- building ----------------------------------------------------------------------------------

    def _add_buffer(self, name: str, value: torch.Tensor) -> None:
        attr = f"_const{len(self._buffers_by_name)}"
        self.register_buffer(attr, value, persistent=value.is_floating_point())
        self._buffers_by_name[name] = attr

    def _add_layer(self, node: Node, inits: dict, shared: dict, latent_init: float) -> None:
        roles = dict(zip(("codebook", "indices", "scales", "bias"), node.inputs[1:]))
        roles = {r: n for r, n in roles.items() if n}
        missing = [n for r, n in roles.items() if n not in inits]
        if missing or len(roles) < 3:
            raise ModelError(f"{sbc.OP_TYPE} node '{node.name}': inputs {missing or node.inputs[1:]} must be "
                             "constant initializers (codebook, indices, scales[, bias])")
        arrays = {r: numpy_helper.to_array(inits[n]) for r, n in roles.items()}
        attrs = {k: v for k, v in node.attrs.items() if k in sbc.CONV_ATTRS}
        if "channels" not in node.attrs:
            raise ModelError(f"{sbc.OP_TYPE} node '{node.name}' has no 'channels' attribute")
        try:
            layer = StackedBinaryConv2d(arrays["codebook"], arrays["indices"], arrays["scales"], arrays.get("bias"),
                                        channels=node.attrs["channels"], latent_init=latent_init, **attrs)
        except ValueError as e:
            raise ModelError(f"{sbc.OP_TYPE} node '{node.name}': {e}") from None
        for role, name in roles.items():  # tensors shared between nodes stay shared
            attr = "latent" if role == "codebook" else role
            if name in shared:
                setattr(layer, attr, shared[name])
            else:
                shared[name] = getattr(layer, attr)
        key = _unique_key(node.name or node.outputs[0], self.layers)
        self.layers[key] = layer
        self.layer_names[node.outputs[0]] = key
        self.layer_tensors[key] = roles

    # --- running -------------------------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor, outputs: Sequence[str] | None = None, **named: torch.Tensor):
        if len(inputs) > len(self.input_names):
            raise ValueError(f"got {len(inputs)} inputs, the graph has {len(self.input_names)}: {self.input_names}")
        values: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs), **named)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise ValueError(f"missing graph inputs {missing}")
        for name, key in self.param_names.items():
            values[name] = self.params[key]
        for name, attr in self._buffers_by_name.items():
            values[name] = getattr(self, attr)
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            if node.op_type == sbc.OP_TYPE:
                results = (self.layers[self.layer_names[node.outputs[0]]](values[node.inputs[0]]),)
            else:
                args = [values[n] if n else None for n in node.inputs]
                results = self._run(node, args)
            for name, value in zip(node.outputs, results):
                if name:
                    values[name] = value
        wanted = self.output_names if outputs is None else list(outputs)
        return tuple(values[n] for n in wanted)

    @staticmethod
    def _run(node: Node, args: list) -> tuple:
        try:
            out = OPS[node.op_type](node, *args)
        except UnsupportedAttribute as e:
            raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): unsupported {e}") from None
        return out if isinstance(out, tuple) else (out,)

    # --- reading back --------------------------------------------------------------------------------

    def stored_tensors(self) -> dict[str, np.ndarray]:
        """Initializer name -> current value in the initializer's dtype: every parameter and every layer
        tensor (packed sign(latent), indices, float16 scales, bias)."""
        out = {}
        for name, key in self.param_names.items():
            out[name] = self.params[key].detach().cpu().numpy().astype(self._dtypes[name])
        for key, layer in self.layers.items():
            for role, arr in layer.stored_tensors().items():
                out[self.layer_tensors[key][role]] = arr.astype(self._dtypes[self.layer_tensors[key][role]])
        return out


def build_module(model_or_path, *, latent_init: float = 0.5) -> OnnxModule:
    """The torch module of an ONNX model (path or ModelProto), original or compressed."""
    model, _ = load_model(model_or_path)
    return OnnxModule(model, latent_init=latent_init)


def layer_outputs(model: onnx.ModelProto) -> list[str]:
    """Output names of the model's StackedBinaryConv nodes, in graph order."""
    return [n.output[0] for n in model.graph.node if n.domain == sbc.DOMAIN and n.op_type == sbc.OP_TYPE]


def logit_names(model: onnx.ModelProto) -> list[str]:
    """The graph outputs, each replaced by its input when it comes out of a Softmax (for distillation)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for out in model.graph.output:
        node = producer.get(out.name)
        soft = node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in DEFAULT_DOMAINS
        names.append(node.input[0] if soft else out.name)
    return names


# --- helpers ---------------------------------------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    raise ModelError("model imports no default ONNX opset")


def _inline_other_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions other than StackedBinaryConv expanded into their bodies."""
    if all(f.domain == sbc.DOMAIN for f in model.functions):
        return model
    ours = sorted({(f.domain, f.name) for f in model.functions if f.domain == sbc.DOMAIN})
    return onnx.inliner.inline_selected_functions(model, ours, exclude=True)


def _node(proto: onnx.NodeProto, index: int, opset: int) -> Node:
    attrs = {}
    for a in proto.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = _to_torch(numpy_helper.to_array(value))
        attrs[a.name] = value
    op_type = proto.op_type if proto.domain in DEFAULT_DOMAINS else f"{proto.domain}.{proto.op_type}"
    if proto.domain == sbc.DOMAIN and proto.op_type == sbc.OP_TYPE:
        op_type = sbc.OP_TYPE
    return Node(op_type, proto.name or f"{proto.op_type}_{index}", list(proto.input), list(proto.output), opset, attrs)


def _check_supported(graph: onnx.GraphProto, nodes: list[Node]) -> None:
    known = set(OPS) | {sbc.OP_TYPE, "Constant"}
    bad: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type not in known:
            bad.setdefault(node.op_type, []).append(node.name)
    if bad:
        listed = "; ".join(f"{op} (node{'s' if len(n) > 1 else ''} {', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
                           for op, n in sorted(bad.items()))
        raise UnsupportedOpError(f"the torch bridge does not support {len(bad)} operator(s) of this model: {listed}")


def _param_initializers(nodes: list[Node], inits: dict) -> set[str]:
    names = set()
    for node in nodes:
        for pos in PARAM_INPUTS.get(node.op_type, ()):
            if pos < len(node.inputs) and node.inputs[pos] in inits:
                if inits[node.inputs[pos]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                         onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
                    names.add(node.inputs[pos])
    return names


def _constant_value(node: Node) -> torch.Tensor:
    a = node.attrs
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise UnsupportedOpError(f"Constant node '{node.name}': only value, value_float(s), value_int(s) are supported")


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    """numpy -> torch; float16/bfloat16/double train as float32, unsigned wide ints as int64, int4/uint4
    (ml_dtypes) as int8/uint8."""
    if arr.dtype.name in ("int4", "uint4"):
        return torch.from_numpy(arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8))
    if arr.dtype.kind == "f":
        return torch.from_numpy(np.array(arr, dtype=np.float32))
    if arr.dtype in (np.uint16, np.uint32, np.uint64, np.int32, np.int16):
        return torch.from_numpy(arr.astype(np.int64))
    return torch.from_numpy(np.array(arr))


def _unique_key(name: str, taken) -> str:
    """A torch-safe attribute name for an ONNX name (letters, digits, _), unique in `taken`."""
    key = re.sub(r"\W", "_", name) or "v"
    key = key if key[0].isalpha() else f"v_{key}"
    candidate, k = key, 1
    while candidate in taken:
        candidate, k = f"{key}_{k}", k + 1
    return candidate
