"""Loading a model from a path or a ModelProto, with one clear error for each way it can be bad."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError

ModelLike = "onnx.ModelProto | str | os.PathLike"


def load_model(model_or_path) -> tuple[onnx.ModelProto, Path | None]:
    """(model, path it came from or None). Raises ModelError for anything that is not a usable model."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        _check(model, "model")
        return model, None
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
        raise ModelError(f"{path}: not an ONNX model or truncated ({_one_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({_one_line(e)})") from None
    if _has_external_data(model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # noqa: BLE001 - any failure here is a bad external file
            raise ModelError(f"{path}: cannot load external data ({_one_line(e)})") from None
    _check(model, str(path))
    return model, path


def _check(model: onnx.ModelProto, where: str) -> None:
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{where}: not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, Exception) as e:  # noqa: BLE001
        raise ModelError(f"{where}: invalid ONNX model ({_one_line(e)})") from None


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__
