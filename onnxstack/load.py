"""Loading a model from a path or a ModelProto, with one clear error for each way it can be bad.

External data is read only from regular files inside the model's folder: a location that is
absolute, climbs out with '..', or resolves (through a symlink) outside the folder is refused before
anything is opened, and every read is bounded by the tensor's declared size. Models past protobuf's
2 GB limit are checked and measured through a skeleton without their large tensors (see `skeleton`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path, PureWindowsPath
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, helper

from .errors import ModelError, one_line
from .graphs import subgraphs

ModelLike = "onnx.ModelProto | str | os.PathLike"
PROTOBUF_LIMIT = (1 << 31) - 1  # bytes a serialised ModelProto can hold
SET_ASIDE_BYTES = 1 << 16  # initializers at least this large are stubs in a skeleton
SET_ASIDE_LOCATION = "onnxstack-set-aside"


def load_model(model_or_path) -> tuple[onnx.ModelProto, Path | None]:
    """(model, path it came from or None). Raises ModelError for anything that is not a usable model."""
    model, path, _ = load_model_and_data_files(model_or_path)
    return model, path


def load_model_and_data_files(model_or_path) -> tuple[onnx.ModelProto, Path | None, tuple[Path, ...]]:
    """As load_model, plus the external data files that were read (resolved paths, in first-use order)."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        for tensor in all_tensors(model):
            if tensor.data_location == TensorProto.EXTERNAL:
                raise ModelError(f"tensor '{tensor.name}' keeps its data in an external file; pass the model's path "
                                 "(not a ModelProto) so that the file can be found next to it")
        validate(model, "model")
        return model, None, ()
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ModelError(f"expected a path or onnx.ModelProto, got {type(model_or_path).__name__}")
    path = Path(model_or_path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not an ONNX model or truncated ({one_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - protobuf raises odd types for odd bytes
        raise ModelError(f"{path}: not an ONNX model ({one_line(e)})") from None
    files = load_external_data(model, path)
    validate(model, str(path))
    return model, path, files


# --- external data ---------------------------------------------------------------------------------


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers, sparse tensors and attribute tensors, in the main
    graph, its subgraphs and the local functions, in a fixed order."""
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
    for _, g in subgraphs(node):
        yield from _graph_tensors(g)


def load_external_data(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """Read every external tensor of a model loaded from `path` into the model; the files read."""
    folder = path.parent
    real_folder = os.path.realpath(folder)
    files: dict[str, None] = {}
    for tensor in all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            files[_read_external(tensor, folder, real_folder, path)] = None
    return tuple(Path(f) for f in files)


def _read_external(tensor: TensorProto, folder: Path, real_folder: str, model_path: Path) -> str:
    info = {e.key: e.value for e in tensor.external_data}
    where = f"{model_path}: tensor '{tensor.name}'"
    location = info.get("location", "")
    file = _safe_location(location, folder, real_folder, where)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelError(f"{where}: external data offset/length are not integers "
                         f"({info.get('offset')!r}, {info.get('length')!r})") from None
    size = os.path.getsize(file)
    if length is None:
        length = size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(f"{where}: external data asks for bytes [{offset}, {offset + length}) of '{location}', "
                         f"which has {size} bytes")
    expected = expected_bytes(tensor)
    if expected is not None and length != expected:
        raise ModelError(f"{where}: external data holds {length} bytes, but shape {list(tensor.dims)} of type "
                         f"{TensorProto.DataType.Name(tensor.data_type)} needs {expected}")
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise ModelError(f"{where}: cannot read external data '{location}' ({one_line(e)})") from None
    tensor.raw_data = data
    tensor.ClearField("data_location")  # as if the data had been inline
    del tensor.external_data[:]
    return file


def _safe_location(location: str, folder: Path, real_folder: str, where: str) -> str:
    """The resolved path of an external data file, which must be a regular file inside the model's folder."""
    if not location:
        raise ModelError(f"{where}: external data without a location")
    if "\0" in location:
        raise ModelError(f"{where}: external data location {location!r} holds a NUL byte")
    if os.path.isabs(location) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive \
            or location.startswith(("/", "\\")):
        raise ModelError(f"{where}: external data location '{location}' is an absolute path; only files in the "
                         "model's folder are read")
    if ".." in re.split(r"[\\/]", location):
        raise ModelError(f"{where}: external data location '{location}' climbs out of the model's folder ('..'); "
                         "only files in the model's folder are read")
    real = os.path.realpath(folder / location)
    if os.path.commonpath([real, real_folder]) != real_folder:
        raise ModelError(f"{where}: external data location '{location}' resolves outside the model's folder "
                         "(a symlink); only files in the model's folder are read")
    if not os.path.exists(real):
        raise ModelError(f"{where}: external data file '{location}' does not exist next to the model")
    if not os.path.isfile(real):
        raise ModelError(f"{where}: external data location '{location}' is not a regular file")
    return real


_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def expected_bytes(tensor: TensorProto) -> int | None:
    """Bytes the raw data of a tensor must hold, from its shape and type (None for strings or unknown types)."""
    n = 1
    for d in tensor.dims:
        n *= d
    if n < 0:
        return None
    if tensor.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:  # noqa: BLE001 - unknown or undefined type
        return None
    return None if dtype == object else n * np.dtype(dtype).itemsize


# --- checks that work past 2 GB --------------------------------------------------------------------


def exceeds_limit(model: onnx.ModelProto) -> bool:
    """Whether the model is too large to serialise as one protobuf."""
    if sum(_raw_size(t) for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL) > PROTOBUF_LIMIT:
        return True  # without serialising, which takes seconds on such a model
    try:
        return model_bytes(model) > PROTOBUF_LIMIT
    except (EncodeError, ValueError):
        return True


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of the model, exact, also past 2 GB (where it is the size with the data written inline).

    Computed on the skeleton: protobuf's ByteSize serialises the message, which costs a pass over every
    byte of the weights; the size of a large raw tensor follows from its stub's and its data's length (the
    length its shape and type need, which load_model has checked it holds)."""
    small, stubs = skeleton(model)
    if not stubs:
        return model.ByteSize()
    graph = small.graph.ByteSize()
    for stub, original in stubs:
        stub_size = stub.ByteSize()
        core = stub_size - sum(_field_bytes(e.ByteSize()) for e in stub.external_data)
        core -= 0 if original.HasField("data_location") else 2  # the stub's data_location: tag + one byte
        graph += _field_bytes(core + _field_bytes(_raw_size(original))) - _field_bytes(stub_size)
    return small.ByteSize() - _field_bytes(small.graph.ByteSize()) + _field_bytes(graph)


def _field_bytes(n: int) -> int:
    """Bytes of a length-delimited field of n bytes whose number is below 16 (one-byte tag)."""
    return 1 + max(1, (n.bit_length() + 6) // 7) + n


def skeleton(model: onnx.ModelProto, *, min_bytes: int = SET_ASIDE_BYTES
             ) -> tuple[onnx.ModelProto, list[tuple[TensorProto, TensorProto]]]:
    """A copy of the model in which every raw initializer of the main graph of at least min_bytes is a stub:
    external data at SET_ASIDE_LOCATION, no bytes. Returns it and the (stub, original) pairs.

    Large bytes are never copied (protobuf keeps every copy until the model is freed), so this works
    on models past 2 GB: the skeleton can be serialised, checked and shape-inferred."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    stubs = []
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
            continue
        for tensor in value:
            if tensor.HasField("raw_data") and _raw_size(tensor) >= min_bytes:
                stub = out.graph.initializer.add()
                for tfd in tensor.DESCRIPTOR.fields:  # not ListFields: it would copy raw_data
                    if tfd.name != "raw_data" and _present(tensor, tfd):
                        _copy_field(stub, tfd, getattr(tensor, tfd.name))
                stub.data_location = TensorProto.EXTERNAL
                stub.external_data.add(key="location", value=SET_ASIDE_LOCATION)
                stubs.append((stub, tensor))
            else:
                out.graph.initializer.add().CopyFrom(tensor)
    return out, stubs


def _copy_field(target, fd, value) -> None:
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    if repeated:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def _present(message, fd) -> bool:
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    return len(getattr(message, fd.name)) > 0 if repeated else message.HasField(fd.name)


def _raw_size(tensor: TensorProto) -> int:
    expected = expected_bytes(tensor)
    return expected if expected is not None else len(tensor.raw_data)


@contextlib.contextmanager
def checkable(model: onnx.ModelProto):
    """The model itself, or (when it has large initializers) its skeleton saved in a temporary folder next to
    an empty file standing for the stubs' external data (the checker wants the file, not its bytes):
    (proto, path). The checker and shape inference then never copy the weights (they serialise the model
    they are given); the raw size check of the stubbed tensors, which the checker would have made, is made here."""
    small, stubs = skeleton(model)
    if not stubs:
        yield model, None
        return
    for _, original in stubs:
        held, needed = len(original.raw_data), expected_bytes(original)
        if needed is not None and held != needed:
            raise ValueError(f"tensor '{original.name}' holds {held} bytes of raw data, but shape "
                             f"{list(original.dims)} of type {TensorProto.DataType.Name(original.data_type)} "
                             f"needs {needed}")
    if exceeds_limit(small):
        raise ValueError("the model is over 2 GB even without the large initializers of its main graph")
    with tempfile.TemporaryDirectory(prefix="onnxstack-check-") as tmp:
        (Path(tmp) / SET_ASIDE_LOCATION).touch()
        path = Path(tmp) / "model.onnx"
        path.write_bytes(small.SerializeToString())
        yield small, str(path)


def check_model(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """onnx.checker.check_model, also past 2 GB (see skeleton); raises onnx's errors.

    full_check adds strict shape inference, which ignores the declared shapes of the graph outputs
    (onnxruntime merges those leniently, and they are the input model's)."""
    with checkable(model) as (proto, path):
        onnx.checker.check_model(path or proto)
        if full_check:
            onnx.shape_inference.infer_shapes(undeclared(proto, value_info=False), check_type=True, strict_mode=True)


def validate(model: onnx.ModelProto, where: str) -> None:
    """ModelError unless the model passes the ONNX checker, strict shape inference and the Conv shape checks."""
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{where}: not an ONNX model (no graph)")
    if not model.graph.output:
        raise ModelError(f"{where}: the graph has no outputs")
    known = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= known:
            raise ModelError(f"{where}: opset {imp.version} is unknown to the installed onnx {onnx.__version__} "
                             f"(it knows 1 to {known})")
    try:
        with checkable(model) as (proto, path):
            try:
                onnx.checker.check_model(path or proto)
            except Exception as e:  # noqa: BLE001 - the checker raises several types
                raise ModelError(f"{where}: invalid ONNX model ({one_line(e)})") from None
            try:
                inferred = onnx.shape_inference.infer_shapes(undeclared(proto), check_type=True, strict_mode=True)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"{where}: inconsistent shapes or types ({one_line(e)})") from None
    except ValueError as e:
        raise ModelError(f"{where}: {e}") from None
    _check_conv_shapes(inferred, model, where)


def undeclared(model: onnx.ModelProto, *, value_info: bool = True) -> onnx.ModelProto:
    """A copy without the declared shapes of the outputs (and of intermediate values). onnxruntime merges
    those leniently with what it infers from the inputs; strict inference here should fail only where
    the operators themselves disagree."""
    out = onnx.ModelProto()
    out.CopyFrom(model)  # a skeleton when the model is past 2 GB: no large bytes
    if value_info:
        del out.graph.value_info[:]
    for o in out.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    return out


def _check_conv_shapes(inferred: onnx.ModelProto, model: onnx.ModelProto, where: str) -> None:
    """Shape inference lets a Conv whose weight does not fit its input through; onnxruntime would not."""
    graph = inferred.graph
    shapes = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w, x = dims.get(node.input[1]), shapes.get(node.input[0])
        name = node.name or f"Conv_{i}"
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w is None:
            continue
        if len(w) < 3:
            raise ModelError(f"{where}: Conv '{name}': weight '{node.input[1]}' has shape {w}; a Conv weight has rank >= 3")
        if group < 1 or w[0] % group:
            raise ModelError(f"{where}: Conv '{name}': group={group} does not divide the {w[0]} filters of weight "
                             f"'{node.input[1]}'")
        if x is not None and len(x) != len(w):
            raise ModelError(f"{where}: Conv '{name}': input '{node.input[0]}' has rank {len(x)}, weight "
                             f"'{node.input[1]}' {w} has rank {len(w)}")
        if x is not None and x[1] is not None and x[1] != w[1] * group:
            raise ModelError(f"{where}: Conv '{name}': input '{node.input[0]}' has {x[1]} channels, but weight "
                             f"'{node.input[1]}' {w} with group={group} needs {w[1] * group}")
        b = dims.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is not None and b != [w[0]]:
            raise ModelError(f"{where}: Conv '{name}': bias '{node.input[2]}' has shape {b}, expected [{w[0]}]")
        _check_conv_attributes(node, name, w, where)


def _check_conv_attributes(node: onnx.NodeProto, name: str, w: list[int], where: str) -> None:
    spatial = len(w) - 2
    attrs = {a.name: list(a.ints) for a in node.attribute if a.type == onnx.AttributeProto.INTS}
    rules = {"kernel_shape": (spatial, lambda v: v == w[2:], f"equal to the weight's kernel {w[2:]}"),
             "strides": (spatial, lambda v: min(v) >= 1, ">= 1"),
             "dilations": (spatial, lambda v: min(v) >= 1, ">= 1"),
             "pads": (2 * spatial, lambda v: min(v) >= 0, ">= 0")}
    for key, (length, ok, what) in rules.items():
        value = attrs.get(key)
        if value is not None and (len(value) != length or not ok(value)):
            raise ModelError(f"{where}: Conv '{name}': {key}={value} must be {length} values {what}")
