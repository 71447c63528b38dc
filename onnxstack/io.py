"""Writing models safely: temporary file in the target folder, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import OutputError


def check_output_path(out: str | os.PathLike, *, overwrite: bool, source: Path | None = None) -> Path:
    """Refuse an output that is the input, sits in a missing folder, or exists (unless overwrite)."""
    out = Path(out)
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise OutputError(f"{out}: output is the input model; choose another path")
    if source is not None and out.resolve() == source.resolve():
        raise OutputError(f"{out}: output is the input model; choose another path")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: no such folder")
    return out


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike, *, overwrite: bool = False,
                      source: Path | None = None) -> Path:
    """Serialise to a temporary file next to `out`, fsync, then rename over it."""
    out = check_output_path(out, overwrite=overwrite, source=source)
    return write_bytes_atomic(model.SerializeToString(), out)


def write_bytes_atomic(data: bytes, out: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out
