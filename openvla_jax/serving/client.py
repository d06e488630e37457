"""A small client for `ActionServer` (or the original OpenVLA deploy server), stdlib only.

    client = ActionClient("http://127.0.0.1:8000")    # token="..." for a server started with one
    action = client.act(image_uint8_hw3, "pick up the red block", unnorm_key="bridge_orig")   # [7]

Each thread keeps one keep-alive connection, so one client may be shared by many threads.
"""

from __future__ import annotations

import http.client
import threading
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np

from openvla_jax.serving import jsonnp

ENCODINGS = ("json_numpy", "list", "encoded")


class ServerError(RuntimeError):
    """The server answered a non-200 status; `.status` and `.message` (its "error" field)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ActionClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0, token: Optional[str] = None):
        """`token`: sent as `Authorization: Bearer <token>` on every request."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must look like http://host:port, got {url!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()

    # ------------------------------------------------------------------------------------ api
    def act(
        self, image, instruction: str, unnorm_key: Optional[str] = None, encoding: str = "json_numpy"
    ) -> np.ndarray:
        """image uint8 `[H, W, 3]` -> action `[7]` float64. `encoding`: "json_numpy" (the original
        client's form), "list" (plain nested lists) or "encoded" (`{"encoded": <JSON text>}`)."""
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        payload = {
            "image": np.asarray(image) if encoding != "list" else np.asarray(image).tolist(),
            "instruction": instruction,
        }
        if unnorm_key is not None:
            payload["unnorm_key"] = unnorm_key
        if encoding == "encoded":
            payload = {"encoded": jsonnp.dumps(payload)}
        status, value = self.request("POST", "/act", jsonnp.dumps(payload).encode())
        if status != 200:
            raise ServerError(status, value.get("error", str(value)) if isinstance(value, dict) else str(value))
        if encoding == "encoded":  # the body is a JSON string holding json-numpy text
            value = jsonnp.loads(value)
        return np.asarray(value, np.float64)

    def health(self) -> dict:
        status, value = self.request("GET", "/health")
        if status != 200:
            raise ServerError(status, str(value))
        return value

    # ------------------------------------------------------------------------------ transport
    def request(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None
    ) -> tuple[int, Any]:
        """-> (status, decoded JSON body, json-numpy arrays as ndarrays). Reconnects once when a
        kept-alive connection was closed by the server in between (safe: /act is idempotent)."""
        for attempt in (0, 1):
            conn = self._conn()
            try:
                head = {"Content-Type": "application/json", **self._auth, **(headers or {})}
                conn.request(method, path, body=body, headers=head)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self._drop()
                break
            except (
                http.client.RemoteDisconnected,
                BrokenPipeError,
                ConnectionResetError,
                http.client.CannotSendRequest,
            ):
                self._drop()
                if attempt:
                    raise
        try:
            value = jsonnp.loads(data)
        except ValueError:
            value = data.decode(errors="replace")
        return resp.status, value

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Closes this thread's connection (others close when their threads end)."""
        self._drop()
