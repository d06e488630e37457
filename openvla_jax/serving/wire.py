"""The `/act` wire format: a request body -> a validated queued request, an action -> the reply.

Accepted bodies (the forms OpenVLA's `deploy.py` and its json-numpy client send):
    {"image": [H][W][3] ints 0..255, "instruction": str, "unnorm_key": str (optional)}   plain JSON
    {"image": <json-numpy uint8 [H, W, 3]>, "instruction": ..., "unnorm_key": ...}        json-numpy
    {"encoded": "<JSON text of either form above>"}              the original's "double encoding"
Anything else raises `BadRequest` (status 400) whose message names the field and what was expected.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from openvla_jax.data.normalize import select_unnorm_key
from openvla_jax.serving import jsonnp

MAX_IMAGE_SIDE = 4096


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    """One validated request waiting for its action; the batching worker fills `action` or `error`
    ("<status>:<message>") and calls `finish()`, which sets `done` and calls `notify` (the HTTP side's
    wake-up: it runs on an event loop, not on a thread that could wait on `done`)."""

    image: np.ndarray
    instruction: str
    unnorm_key: Optional[str]
    done: threading.Event = field(default_factory=threading.Event)
    action: Optional[np.ndarray] = None
    error: Optional[str] = None
    notify: Optional[Callable[[], None]] = None

    def finish(self) -> None:
        self.done.set()
        if self.notify is not None:
            try:
                self.notify()
            except RuntimeError:  # its event loop has closed (the server stopped): nobody is waiting
                pass


def _image(x) -> np.ndarray:
    """A JSON image (nested list or decoded json-numpy array) -> uint8 `[H, W, 3]`, or BadRequest."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise BadRequest(f"'image' must have dtype uint8, got {x.dtype}")
        img = x
    elif isinstance(x, list):
        try:
            img = np.asarray(x)
        except ValueError as e:  # ragged nesting
            raise BadRequest(f"'image' is not a rectangular [H][W][3] nested list ({e})") from None
        if img.dtype.kind not in "iu":  # floats, bools, strings, objects
            raise BadRequest(f"'image' must hold integers 0..255, got values of type {img.dtype}")
        if img.size and (img.min() < 0 or img.max() > 255):
            raise BadRequest(f"'image' values must lie in 0..255, got {img.min()}..{img.max()}")
    else:
        raise BadRequest(
            f"'image' must be an [H][W][3] list of ints or a json-numpy uint8 array, got {type(x).__name__}"
        )
    if img.ndim != 3 or img.shape[-1] != 3:
        raise BadRequest(f"'image' must have shape [H, W, 3] (RGB), got shape {list(img.shape)}")
    h, w = img.shape[:2]
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
        raise BadRequest(f"'image' height and width must be in 1..{MAX_IMAGE_SIDE}, got {h}x{w}")
    return img.astype(np.uint8, copy=False)


def parse_act(body: bytes, norm_stats: dict) -> tuple[Pending, str]:
    """A `/act` body -> (queued request, reply encoding in {"list", "json_numpy", "encoded"})."""
    try:
        payload = jsonnp.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    encoding = "list"
    if "encoded" in payload:
        if len(payload) != 1 or not isinstance(payload["encoded"], str):
            raise BadRequest("an 'encoded' body must be {\"encoded\": <JSON text>} with no other keys")
        try:
            payload = jsonnp.loads(payload["encoded"])
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"malformed JSON in 'encoded': {e}") from None
        if not isinstance(payload, dict):
            raise BadRequest(f"'encoded' must hold a JSON object, got {type(payload).__name__}")
        encoding = "encoded"
    if "image" not in payload:
        raise BadRequest("missing 'image' (an [H, W, 3] uint8 array)")
    if isinstance(payload["image"], np.ndarray) and encoding == "list":
        encoding = "json_numpy"
    image = _image(payload["image"])
    instruction = payload.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest(f"'instruction' must be a non-empty string, got {instruction!r:.80}")
    key = payload.get("unnorm_key")
    if key is not None and not isinstance(key, str):
        raise BadRequest(f"'unnorm_key' must be a string or absent, got {type(key).__name__}")
    try:
        select_unnorm_key(norm_stats, key)  # the same check predict_action makes, answered as a 400
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return Pending(image, instruction, key), encoding


def encode_action(action: np.ndarray, encoding: str) -> Any:
    """The JSON value answered for `action` `[7]`, in the request's form (see the module doc)."""
    if encoding == "list":
        return action.tolist()
    if encoding == "json_numpy":
        return jsonnp.encode_array(action)
    return jsonnp.dumps(action)
