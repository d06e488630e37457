"""The `json_numpy` wire format, without the dependency: what OpenVLA's deploy client sends.

An array travels as a JSON object

    {"__numpy__": base64(raw C-order bytes), "dtype": dtype.str (e.g. "|u1", "<f8"), "shape": [...]}

which is what `json_numpy` (2.x, `json_numpy.patch()` in the original client and server) writes;
`loads` also accepts any dtype name `np.dtype` parses ("uint8"), as older `json_numpy` wrote. A
shape of `[]` is a scalar. Object and structured dtypes are refused: their bytes are not data.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

KEY = "__numpy__"


def encode_array(a) -> dict:
    """ndarray or numpy scalar -> the json-numpy dict."""
    a = np.asarray(a)  # not ascontiguousarray: it turns a scalar into shape [1]; tobytes() is C order
    return {KEY: base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.str, "shape": list(a.shape)}


def decode_array(d: dict) -> np.ndarray:
    """The json-numpy dict -> ndarray (read-only view of the decoded bytes). Raises ValueError naming
    the field that is wrong."""
    data, dtype, shape = d.get(KEY), d.get("dtype"), d.get("shape")
    if not isinstance(data, str):
        raise ValueError(f"json-numpy array: '{KEY}' must be a base64 string, got {type(data).__name__}")
    if not isinstance(dtype, str):
        raise ValueError(f"json-numpy array: 'dtype' must be a string such as '|u1', got {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"json-numpy array: 'shape' must be a list of non-negative ints, got {shape!r}")
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"json-numpy array: unknown dtype {dtype!r}") from e
    if dt.hasobject or dt.fields is not None or dt.itemsize == 0:
        raise ValueError(f"json-numpy array: dtype {dtype!r} is not a plain numeric dtype")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"json-numpy array: '{KEY}' is not valid base64 ({e})") from e
    n = int(np.prod(shape, dtype=np.int64))
    if len(raw) != n * dt.itemsize:
        raise ValueError(
            f"json-numpy array: {len(raw)} bytes do not hold shape {shape} of {dt} ({n * dt.itemsize} bytes expected)"
        )
    return np.frombuffer(raw, dt).reshape(shape)


def _default(o):
    if isinstance(o, (np.ndarray, np.generic)):
        return encode_array(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _hook(d: dict):
    return decode_array(d) if KEY in d else d


def dumps(obj: Any) -> str:
    """JSON text with every ndarray / numpy scalar in `obj` json-numpy encoded."""
    return json.dumps(obj, default=_default)


def loads(text) -> Any:
    """JSON text (str or bytes) -> Python objects, json-numpy dicts decoded to ndarrays.
    Raises ValueError (json.JSONDecodeError is one) on bad JSON or a bad array."""
    return json.loads(text, object_hook=_hook)
