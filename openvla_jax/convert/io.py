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

    `shapes` and `dtypes` come from the headers without reading any data. Tensors are read with
    plain file reads into a fresh array, not through a memory map: mapped pages that were touched
    stay in the process's resident set, so reading a 15 GB checkpoint through mmap would show (and
    on some systems hold) 15 GB; this way only the tensor being converted is resident.
    """

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (file, start byte, end byte)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            header, data_start = read_header(f, with_offset=True)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in both {self._where[key][0]} and {f}")
                begin, end = info["data_offsets"]
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
        out = np.empty(self.shapes[key], dtype)
        if out.nbytes != end - begin:
            raise ValueError(
                f"{path}: tensor {key!r} header says {end - begin} bytes, but shape "
                f"{self.shapes[key]} x {dtype} is {out.nbytes}; the file is corrupt"
            )
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(path, "rb") as f:
            f.seek(begin)
            got = f.readinto(view)
        if got != out.nbytes:
            raise ValueError(
                f"{path} is truncated: tensor {key!r} needs bytes {begin}..{end}, file ends after {begin + got}"
            )
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_header(path: Path, with_offset: bool = False):
    """The JSON header of a safetensors file (and, with `with_offset`, where the data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    return (header, 8 + n) if with_offset else header


def open_state_dict(path: os.PathLike | str) -> SafetensorsReader:
    """Open a `.safetensors` file, or a directory with `model.safetensors` or a sharded index."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(_pickle_refusal(path))
        return SafetensorsReader([path])
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{path / INDEX_NAME} names shards that are not there: {missing}")
        reader = SafetensorsReader([path / s for s in shards])
        listed = set(index["weight_map"])
        if listed != set(reader):
            raise ValueError(
                f"{path / INDEX_NAME} and its shards disagree: in index only "
                f"{sorted(listed - set(reader))}, in shards only {sorted(set(reader) - listed)}"
            )
        return reader
    if (path / SINGLE_NAME).exists():
        return SafetensorsReader([path / SINGLE_NAME])
    singles = sorted(path.glob("*.safetensors"))
    if singles:
        return SafetensorsReader(singles)
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
