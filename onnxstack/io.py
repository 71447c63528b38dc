"""Writing models safely: temporary files in the target folder, fsync, then atomic renames.

A model is written inline, or with the large initializers of its main graph (EXTERNAL_MIN_BYTES and
up) in one external data file `<output>.data` next to it, at 64-byte aligned offsets; small tensors
(shapes, scalars) and tensors inside nodes stay inline. External data is used when asked (and the
model has a large initializer), and always past protobuf's 2 GB limit.

Crash safety: nothing is written under the final names until the bytes are on disk. The data file
is renamed into place first, then the model, so a model never points at a missing or half-written
data file (only a kill in the instant between the two renames leaves a complete data file without
its model). A killed process can leave its temporary files, named `.<output name>.<pid>.<random>.tmp`;
the next save to the same output deletes those whose process is gone. The output never equals the
input model or one of its data files.

ONNXSTACK_TEST_WRITE_DELAY (test-only): seconds to sleep half-way through writing each temporary
file, so that tests can kill a writer mid-write.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import onnx
from onnx import TensorProto

from .errors import OutputError
from .load import all_tensors, exceeds_limit, expected_bytes, skeleton

EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inline in a model with external data
ALIGN = 64
WRITE_DELAY_ENV = "ONNXSTACK_TEST_WRITE_DELAY"


def data_file_path(out: Path) -> Path:
    """The external data file that goes with model file `out`."""
    return out.with_name(out.name + ".data")


def check_output_path(out: str | os.PathLike, *, overwrite: bool, source: Path | None = None,
                      protect: tuple[Path, ...] = ()) -> Path:
    """Refuse an output that is the input (or one of its data files), sits in a missing folder, or exists
    (unless overwrite)."""
    out = Path(out)
    for src in ((source,) if source is not None else ()) + tuple(protect):
        if out.exists() and src.exists() and os.path.samefile(out, src) or out.resolve() == Path(src).resolve():
            what = "the input model" if src == source else f"a data file of the input model ({src.name})"
            raise OutputError(f"{out}: output is {what}; choose another path")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass overwrite=True to replace it")
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: no such folder")
    return out


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike, *, overwrite: bool = False,
                      source: Path | None = None, external_data: bool | None = False,
                      protect: tuple[Path, ...] = ()) -> Path:
    """Write `model` to `out` (and `<out>.data` with external data) without ever leaving a partial file.

    external_data: True, False, or None (only when needed); a model past 2 GB always uses it.
    protect: files the output must not replace (the input's external data files)."""
    out = check_output_path(out, overwrite=overwrite, source=source, protect=protect)
    too_big = exceeds_limit(model)
    if external_data is False and too_big:
        raise OutputError(f"{out}: the model is over 2 GB and must be written with external data")
    if not (external_data or too_big) or not _has_large_initializer(model):
        return write_bytes_atomic(model.SerializeToString(), out)
    data = check_output_path(data_file_path(out), overwrite=overwrite, source=source, protect=protect)
    _remove_stale_temps(out)
    _remove_stale_temps(data)
    data_tmp = _temp(data)
    model_tmp = None
    try:
        with open(data_tmp, "r+b") as f:
            proto = _write_external(model, f, data.name)
            f.flush()
            os.fsync(f.fileno())
        model_tmp = _temp(out)
        with open(model_tmp, "r+b") as f:
            _write(f, proto)
            f.flush()
            os.fsync(f.fileno())
        os.replace(data_tmp, data)
        os.replace(model_tmp, out)
    except BaseException:
        for tmp in (data_tmp, model_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return out


def _has_large_initializer(model: onnx.ModelProto) -> bool:
    return any(t.HasField("raw_data") and (expected_bytes(t) or 0) >= EXTERNAL_MIN_BYTES
               for t in model.graph.initializer)


def write_bytes_atomic(data: bytes, out: Path) -> Path:
    """Write bytes to a temporary file next to `out`, fsync, then rename over `out`."""
    out = Path(out)
    _remove_stale_temps(out)
    tmp = _temp(out)
    try:
        with open(tmp, "r+b") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _write_external(model: onnx.ModelProto, f, location: str) -> bytes:
    """Write the large initializers' bytes to `f`; the serialised model that points at them, as `location`."""
    offset = 0
    delay = _delay()
    small, stubs = skeleton(model, min_bytes=EXTERNAL_MIN_BYTES)
    for k, (stub, original) in enumerate(stubs):
        pad = -offset % ALIGN
        f.write(b"\0" * pad)
        offset += pad
        raw = original.raw_data
        f.write(raw)
        if delay and k == len(stubs) // 2:
            f.flush()
            time.sleep(delay)
        del stub.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            stub.external_data.add(key=key, value=value)
        offset += len(raw)
        del raw
    if exceeds_limit(small):
        raise OutputError("the model is over 2 GB even with its large initializers in external data")
    return small.SerializeToString()


def _write(f, data: bytes) -> None:
    delay = _delay()
    if not delay:
        f.write(data)
        return
    half = len(data) // 2
    f.write(data[:half])
    f.flush()
    time.sleep(delay)
    f.write(data[half:])


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get(WRITE_DELAY_ENV, "0") or 0))
    except ValueError:
        return 0.0


def _temp(out: Path) -> str:
    """A new temporary file next to `out`, with the mode a plain open() would give it (0666 less the
    umask; mkstemp's own 0600 would follow the file through the rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return tmp


def _umask() -> int:
    """The process umask (read from /proc where it can be, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files of `out` left by processes that no longer run (killed mid-write)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(\d+)\.[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(out.parent / name)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: checks the process exists, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in all_tensors(model))
