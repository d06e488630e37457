"""Safetensors in and out, one tensor at a time, and state-dict key checks.

Never unpickles: `.bin`/`.pt` checkpoints are refused. Reading is lazy (a Mapping whose values are
read from disk on access); writing streams tensors into a file whose header is computed first, and
renames it into place only when complete, so a crash never leaves a file that looks whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable, Optional, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


class StateDictError(ValueError):
    """A state dict does not have the keys or shapes a model needs; lists every offender."""

    def __init__(self, source: str, missing=(), unexpected=(), misshapen=()):
        self.missing, self.unexpected, self.misshapen = list(missing), list(unexpected), list(misshapen)
        lines = [f"state dict from {source} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.misshapen:
            lines.append(
                f"  misshapen keys ({len(self.misshapen)}): "
                + ", ".join(f"{k} (expected {tuple(e)}, got {tuple(g)})" for k, e, g in self.misshapen)
            )
        super().__init__("\n".join(lines))


def check_state_dict(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]], source: str):
    """Raise StateDictError unless `got` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshapen = sorted(
        (k, tuple(expected[k]), tuple(got[k])) for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k])
    )
    if missing or unexpected or misshapen:
        raise StateDictError(source, missing, unexpected, misshapen)


class SafetensorsReader(Mapping):
    """Lazy, read-only view of one or several safetensors files: `reader[key]` reads one tensor.

    `shapes` and `dtypes` come from the headers without reading any data; every header entry is
    checked (dtype, shape, offsets inside the file) before any tensor is read. Weights must be
    floating point and finite unless `allow_nonfloat` / `allow_nonfinite`: a model converted from
    integer or NaN weights would run and emit garbage actions. Tensors are read with
    plain file reads into a fresh array, not through a memory map: mapped pages that were touched
    stay in the process's resident set, so reading a 15 GB checkpoint through mmap would show (and
    on some systems hold) 15 GB; this way only the tensor being converted is resident.
    """

    def __init__(self, files: Sequence[Path], allow_nonfloat: bool = False, allow_nonfinite: bool = False):
        self.files = [Path(f) for f in files]
        self.allow_nonfloat, self.allow_nonfinite = allow_nonfloat, allow_nonfinite
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (file, start byte, end byte)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            header, data_start = read_header(f, with_offset=True)
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict):
                raise ValueError(f"{f}: safetensors __metadata__ must be a JSON object, got {type(meta).__name__}")
            self.metadata.update(meta)
            data_size = f.stat().st_size - data_start
            for key, info in header.items():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in both {self._where[key][0]} and {f}")
                begin, end = _check_entry(f, key, info, data_size)
                self._where[key] = (f, data_start + begin, data_start + end)
                self.shapes[key] = tuple(info["shape"])
                self.dtypes[key] = info["dtype"]

    def __getitem__(self, key: str) -> np.ndarray:
        path, begin, end = self._where[key]
        dtype = _NP_DTYPES.get(self.dtypes[key])
        if dtype is None:
            raise ValueError(
                f"{path}: tensor {key!r} has safetensors dtype {self.dtypes[key]}, expected one of {sorted(_NP_DTYPES)}"
            )
        if self.dtypes[key] not in _FLOAT_DTYPES and not self.allow_nonfloat:
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {self.dtypes[key]}; model weights must be floating point "
                f"({', '.join(_FLOAT_DTYPES)}). Pass allow_nonfloat=True to open_state_dict if this is intended"
            )
        out = np.empty(self.shapes[key], dtype)
        if out.nbytes != end - begin:
            raise ValueError(
                f"{path}: tensor {key!r} header says {end - begin} bytes, but shape "
                f"{self.shapes[key]} x {dtype} is {out.nbytes}; the file is corrupt"
            )
        view = memoryview(out.reshape(-1).view(np.uint8))  # pyright: ignore[reportArgumentType]  (numpy stubs: __buffer__ on 3.12+)
        with open(path, "rb") as f:
            f.seek(begin)
            got = f.readinto(view)
        if got != out.nbytes:
            raise ValueError(
                f"{path} is truncated: tensor {key!r} needs bytes {begin}..{end}, file ends after {begin + got}"
            )
        if not self.allow_nonfinite and self.dtypes[key] in _FLOAT_DTYPES:
            bad = int(out.size - np.count_nonzero(np.isfinite(out)))
            if bad:
                raise ValueError(
                    f"{path}: tensor {key!r} holds {bad} non-finite values (NaN or inf) of {out.size}; a model "
                    "with them emits garbage actions. Pass allow_nonfinite=True to open_state_dict to load anyway"
                )
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_header(path: Path, with_offset: bool = False):
    """The JSON header of a safetensors file (and, with `with_offset`, where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):  # checked before allocating: a corrupt size is not a MemoryError
            raise ValueError(
                f"{path}: safetensors header claims {n} bytes, but the file has {size - 8} after the size field "
                f"(and headers are at most {MAX_HEADER_BYTES}); the file is corrupt or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    return (header, 8 + n) if with_offset else header


def _check_entry(path: Path, key: str, info, data_size: int) -> tuple[int, int]:
    """(begin, end) of tensor `key`'s bytes after checking its header entry names a dtype, a shape and
    offsets inside the file's data."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        have = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: header entry {key!r} needs dtype, shape and data_offsets; has {have}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{path}: tensor {key!r} has shape {shape!r}; expected a list of non-negative ints")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok or not 0 <= offsets[0] <= offsets[1] <= data_size:
        raise ValueError(
            f"{path}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end] within the file's "
            f"{data_size} data bytes"
        )
    return offsets[0], offsets[1]


def open_state_dict(
    path: os.PathLike | str, allow_nonfloat: bool = False, allow_nonfinite: bool = False
) -> SafetensorsReader:
    """Open a `.safetensors` file, or a directory with `model.safetensors` or a sharded index (whose
    shards must lie inside the directory). See `SafetensorsReader` for the two `allow_` options."""
    path = Path(path)
    opts = dict(allow_nonfloat=allow_nonfloat, allow_nonfinite=allow_nonfinite)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(_pickle_refusal(path))
        return SafetensorsReader([path], **opts)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / INDEX_NAME).exists():
        index_path = path / INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
        except ValueError as e:
            raise ValueError(f"{index_path}: unreadable JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: expected {{'weight_map': {{tensor name: shard file name}}}}")
        shards = sorted(set(weight_map.values()))
        root = path.resolve()
        outside = [s for s in shards if not (path / s).resolve().is_relative_to(root)]
        if outside:
            raise ValueError(f"{index_path} names shard files outside {path}: {outside}")
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are not there: {missing}")
        reader = SafetensorsReader([path / s for s in shards], **opts)
        listed = set(weight_map)
        if listed != set(reader):
            raise ValueError(
                f"{path / INDEX_NAME} and its shards disagree: in index only "
                f"{sorted(listed - set(reader))}, in shards only {sorted(set(reader) - listed)}"
            )
        return reader
    if (path / SINGLE_NAME).exists():
        return SafetensorsReader([path / SINGLE_NAME], **opts)
    singles = sorted(path.glob("*.safetensors"))
    if singles:
        return SafetensorsReader(singles, **opts)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ValueError(_pickle_refusal(path / pickles[0]))
    raise FileNotFoundError(f"no safetensors files in {path}")


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path} is not a safetensors file. openvla_jax never loads pickled checkpoints (.bin/.pt), "
        "since unpickling runs arbitrary code. Convert it once where you trust it, e.g. "
        "`model = AutoModelForVision2Seq.from_pretrained(dir, trust_remote_code=True); "
        "model.save_pretrained(out_dir, safe_serialization=True)`."
    )


def write_safetensors(
    path: os.PathLike | str,
    entries: Sequence[tuple[str, Sequence[int], np.dtype]],
    get: Callable[[str], np.ndarray],
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Stream tensors into one safetensors file: `entries` gives (key, shape, dtype) up front and
    `get(key)` produces each array when its turn comes, so only one tensor is in memory at a time.

    Written to `<path>.partial` and renamed on success: an interrupted write leaves no `path`.
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "np"})}
    offset = 0
    for key, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in entries:
            arr = np.asarray(get(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(
                    f"tensor {key!r}: announced {tuple(shape)} {np.dtype(dtype)}, got {arr.shape} {arr.dtype}"
                )
            f.write(np.ascontiguousarray(arr).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def save_state_dict(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write an in-memory state dict to one safetensors file (atomic)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    write_safetensors(path, [(k, a.shape, a.dtype) for k, a in arrays.items()], arrays.__getitem__, metadata)
