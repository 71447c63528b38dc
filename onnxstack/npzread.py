"""Reading a .npz without holding it: the members np.savez stores uncompressed are read row by row.

    arrays = read_npz("images.npz")      # name -> StoredArray (stored member) or np.ndarray (loaded whole)
    x = arrays["x"].rows(np.arange(64))  # just those samples, read from the file

np.savez writes each array as an uncompressed (ZIP_STORED) .npy member, so its data are one contiguous run
of bytes in the file: the member's local header sits at its header offset, and the .npy data begin after

    header offset + 30 + len(file name) + len(extra field)      (the zip local file header)
    + the .npy header                                              (np.lib.format: magic, then a dict)

Rows are read with file reads into the output (runs of consecutive indices coalesced into one read), not
memory-mapped: pages a memory map has touched stay resident. What cannot be read so is loaded whole, as
np.load would: compressed npz (np.savez_compressed): loaded whole; Fortran-ordered arrays, object arrays
(refused, as np.load refuses them) and members that are not .npy files likewise.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, one_line

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then file name and extra field lengths (30 bytes)
_CHUNK_BYTES = 8 << 20  # a whole-array read (load, scan) goes this many bytes at a time


@dataclass(frozen=True)
class StoredArray:
    """One uncompressed .npy member of a .npz: its shape and dtype from the header, rows read on demand."""

    path: str
    offset: int  # of the array data in the file
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, idx) -> np.ndarray:
        """The samples idx (any order, repeats allowed) as a new array of shape (len(idx), *shape[1:])."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx),) + self.shape[1:], self.dtype)
        if not len(idx) or not self.row_bytes:
            return out
        if idx.min() < 0 or idx.max() >= self.shape[0]:
            raise IndexError(f"sample index out of range for {self.shape[0]} samples")
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1  # runs of consecutive indices: one read each
        in_place = bool(np.all(order == np.arange(len(idx))))
        flat = out.reshape(len(idx), -1)
        with open(self.path, "rb") as f:
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(idx)]):
                block = flat[a:b] if in_place else np.empty((b - a, flat.shape[1]), self.dtype)
                self._read(f, int(ordered[a]), block)
                if not in_place:
                    flat[order[a:b]] = block
        return out

    def load(self) -> np.ndarray:
        """The whole array (what np.load gives)."""
        return self.rows(np.arange(self.shape[0]))

    def chunks(self):
        """The array in consecutive row blocks of about _CHUNK_BYTES (a scan that holds one block)."""
        step = max(1, _CHUNK_BYTES // max(self.row_bytes, 1))
        for start in range(0, self.shape[0], step):
            yield self.rows(np.arange(start, min(start + step, self.shape[0])))

    def _read(self, f, first: int, block: np.ndarray) -> None:
        f.seek(self.offset + first * self.row_bytes)
        view = memoryview(block).cast("B")
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise DataError(f"{self.path}: not a readable .npz file (array data truncated)")
            got += n


def read_npz(path: Path) -> dict[str, StoredArray | np.ndarray]:
    """Every member of a .npz by key (as np.load names them): stored .npy members unread, the rest loaded whole.
    A file that is not a readable .npz is one DataError line."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single .npy array")
            names = set(f.zip.namelist())
            out: dict[str, StoredArray | np.ndarray] = {}
            with open(path, "rb") as raw:
                for key in f.files:
                    info = f.zip.getinfo(key if key in names else key + ".npy")
                    stored = _stored(raw, info, str(path))
                    out[key] = stored if stored is not None else f[key]
            return out
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and OS errors alike mean a bad file
        raise DataError(f"{path}: not a readable .npz file ({one_line(e)})") from None


def _stored(raw, info: zipfile.ZipInfo, path: str) -> StoredArray | None:
    """The member as a StoredArray when its .npy data can be read in place, else None (load it whole)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed, or encrypted
        return None
    raw.seek(info.header_offset)
    head = raw.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        return None
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    if signature != b"PK\x03\x04":
        return None
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    raw.seek(start)
    try:
        version = np.lib.format.read_magic(raw)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
        else:
            return None
    except ValueError:  # not a .npy member: np.load gives its bytes
        return None
    offset = raw.tell()
    if fortran or dtype.hasobject or not shape:
        return None
    stored = StoredArray(path, offset, tuple(int(s) for s in shape), np.dtype(dtype))
    if offset - start + stored.shape[0] * stored.row_bytes > info.file_size:
        raise DataError(f"{path}: not a readable .npz file (member '{info.filename}' is truncated)")
    return stored


# --- checks against a model input (a data.InputSpec): shape and dtype from the header, values only
# --- where a cast could overflow, read a block at a time


def check_shape(arr: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """Rank and static dims (past the sample axis) must match; symbolic dims accept anything."""
    bad = arr.ndim == 0
    if spec.shape is not None:
        bad = bad or arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and arr.shape[i] != d for i, d in enumerate(spec.shape) if i > 0)
    if bad:
        raise DataError(f"{source}: data for input '{spec.name}' has shape {arr.shape}, "
                        f"the model expects {spec.describe()}")
    return arr


def cast(arr, spec: InputSpec, source: str):
    """Floats to float inputs and integers to integer inputs (in range); anything else is an error. A
    StoredArray is checked (its values scanned a block at a time where the cast could overflow) and comes
    back as it is: its rows are cast as they are read."""
    want, have = spec.dtype, arr.dtype
    stored = isinstance(arr, StoredArray)
    if want.kind == "f" and have.kind == "f":
        return arr if stored else arr.astype(want, copy=False)
    if want.kind in "iu" and have.kind in "iu":
        info = np.iinfo(want)
        blocks = ([] if np.can_cast(have, want) else arr.chunks()) if stored else [arr]
        if any(b.size and (b.min() < info.min or b.max() > info.max) for b in blocks):
            raise DataError(f"{source}: data for input '{spec.name}' {arr.shape} has values outside {want}")
        return arr if stored else arr.astype(want, copy=False)
    if want.kind == have.kind == "b":
        return arr
    hint = "; convert it to floats and scale it (e.g. x / 255) first" if want.kind == "f" and have.kind in "iub" else ""
    raise DataError(f"{source}: data for input '{spec.name}' {arr.shape} is {have}, the model expects {want}{hint}")


def sample_count(feeds: dict, source: str) -> int:
    counts = {k: v.shape[0] for k, v in feeds.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{k}' {feeds[k].shape}" for k in counts)
        raise DataError(f"{source}: inputs differ in sample count (axis 0): {listed}")
    n = next(iter(counts.values()), 0)
    if n == 0:
        listed = ", ".join(f"'{k}' {v.shape}" for k, v in feeds.items())
        raise DataError(f"{source}: no samples (data for input {listed})")
    return n


def check_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    """Class ids: shape (n,), integral, >= 0; returned as int64."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"{source}: labels have shape {labels.shape}, expected ({n},): one class id per sample")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0)):
        raise DataError(f"{source}: labels {labels.shape} must be integer class ids, got {labels.dtype} values")
    if labels.min() < 0:
        raise DataError(f"{source}: labels {labels.shape} hold negative class id {int(labels.min())}")
    return labels.astype(np.int64)
