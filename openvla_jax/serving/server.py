"""An HTTP action server compatible with OpenVLA's `vla-scripts/deploy.py`, with dynamic batching.

    server = ActionServer(OpenVLA.load(path), max_batch=16, max_wait_ms=5).start()   # 127.0.0.1
    ...  # POST {server.url}/act
    server.stop()

Endpoints
- `POST /act`, body one of (parsed in `wire.py`)
    {"image": [H][W][3] ints 0..255, "instruction": str, "unnorm_key": str (optional)}   plain JSON
    {"image": <json-numpy uint8 [H, W, 3]>, "instruction": ..., "unnorm_key": ...}        json-numpy
    {"encoded": "<JSON text of either form above>"}              the original's "double encoding"
  The answer is the action `[7]` (float64), in the request's form: a JSON list for a plain request,
  a json-numpy object for a json-numpy one, and for `encoded` a JSON *string* holding the json-numpy
  text (what the original returns with `JSONResponse(json_numpy.dumps(action))`). Like the original,
  the action is the whole body, not wrapped in an object.
- `GET /health`: model facts, batching settings, request and model-call counters.

Errors are JSON `{"error": message}`: 400 bad JSON / image (rank, shape, dtype, range) / instruction /
unnorm_key (the message lists the known keys), 404 unknown path, 405 wrong method, 411 no
Content-Length, 413 body over `max_body_bytes`, 500 the model raised on this request (a batch that
fails is retried request by request, so only the failing ones answer 500), 503 shutting down, 504 no
answer within `request_timeout_s`. No request can stop the server: every handler catches everything.

Batching: each HTTP handler thread validates its request and queues it; one worker thread takes the
first queued request, keeps collecting until it holds `max_batch` of them or `max_wait_ms` has passed
since that first one, then calls `predict_action` once per `unnorm_key` in the batch and answers each
handler. `max_batch=1` turns batching off (one model call per request, no waiting). Rows of one
batch cannot affect each other: `OpenVLA.predict_action` decodes each row at its own length.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import numpy as np

from openvla_jax.models.config import as_config
from openvla_jax.serving.wire import BadRequest, Pending, encode_action, parse_act

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20  # a 1080p RGB frame as a JSON list is ~25 MB


class ActionServer:
    """Serves `vla.predict_action(images, instructions, unnorm_key)` (any object with that method
    and a `norm_stats` dict) over HTTP. `port=0` picks a free port (see `.url`)."""

    def __init__(
        self,
        vla,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        request_timeout_s: float = 120.0,
        access_log: bool = False,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        extra = {k: getattr(vla, k) for k, d in (("num_images", 1), ("proprio_dim", 0)) if getattr(vla, k, d) != d}
        if extra:
            raise ValueError(
                f"the /act protocol carries one image and no robot state; this model has {extra} "
                "(OFT options): call OpenVLA.predict_action directly"
            )
        self.vla = vla
        self.max_batch, self.max_wait_ms = int(max_batch), float(max_wait_ms)
        self.max_body_bytes, self.request_timeout_s = int(max_body_bytes), float(request_timeout_s)
        self.access_log = access_log
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = Counter()
        self._batch_sizes = Counter()
        self._httpd = _HTTPServer((host, port), _handler_class(self))
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> "ActionServer":
        """Starts the batching worker and the HTTP loop in daemon threads; returns self."""
        for target, name in ((self._worker, "vla-batcher"), (self._httpd.serve_forever, "vla-http")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        """Blocks serving until KeyboardInterrupt (for scripts/serve.py)."""
        self.start()
        try:
            while not self._stop.is_set():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._threads:  # shutdown() waits for a serve_forever loop that never started otherwise
            self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=10)
        while True:  # anything still queued is answered, not left hanging
            try:
                p = self._queue.get_nowait()
            except queue.Empty:
                break
            p.error = "503:server is shutting down"
            p.done.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def warmup(self, image_hw=(224, 224), instruction: str = "pick up the object") -> None:
        """Compiles every batch bucket (1, 2, 4, ... up to max_batch) before the first request."""
        key = next(iter(sorted(self.vla.norm_stats)), None) if len(self.vla.norm_stats) > 1 else None
        image = np.zeros((*image_hw, 3), np.uint8)
        b = 1
        while True:
            self.vla.predict_action([image] * b, [instruction] * b, unnorm_key=key)
            if b >= self.max_batch:
                break
            b = min(2 * b, self.max_batch)

    # ------------------------------------------------------------------------------- status
    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "batch_sizes": dict(sorted(self._batch_sizes.items()))}

    def health(self) -> dict:
        vla = self.vla
        config = getattr(vla, "config", None)
        params = getattr(vla, "params", None)
        dtype = None
        if params is not None:
            import jax

            leaves = jax.tree.leaves(params)
            dtype = str(leaves[0].dtype) if leaves else None
        return {
            "status": "ok",
            "model": {
                "class": type(vla).__name__,
                "variant": as_config(config).variant if config is not None else None,
                "action_dim": getattr(vla, "action_dim", None),
                "dtype": dtype,
                "unnorm_keys": sorted(vla.norm_stats),
            },
            "batching": {"enabled": self.max_batch > 1, "max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms},
            "max_body_bytes": self.max_body_bytes,
            "stats": self.stats(),
        }

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # ------------------------------------------------------------------------------ batching
    def submit(self, pending: Pending) -> None:
        if self._stop.is_set():
            pending.error = "503:server is shutting down"
            pending.done.set()
            return
        self._queue.put(pending)

    def _collect(self) -> list[Pending]:
        """Blocks for one request, then gathers more until max_batch or the wait bound."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait_ms / 1000.0
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the deadline still take what is already queued: it costs no waiting
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _worker(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._run(batch)

    def _predict(self, group: list[Pending], key: Optional[str]) -> None:
        actions = np.asarray(
            self.vla.predict_action([p.image for p in group], [p.instruction for p in group], unnorm_key=key)
        )
        if actions.ndim not in (2, 3) or actions.shape[0] != len(group):  # [n, 7] or chunks [n, K, 7]
            raise RuntimeError(f"predict_action returned shape {actions.shape} for {len(group)} requests")
        for p, a in zip(group, actions):
            p.action = a

    def _run(self, batch: list[Pending]) -> None:
        groups: dict[Optional[str], list[Pending]] = {}
        for p in batch:
            groups.setdefault(p.unnorm_key, []).append(p)
        for key, group in groups.items():
            try:
                self._predict(group, key)
            except Exception as e:  # noqa: BLE001 -- one failing batch must not stop the worker
                if len(group) == 1:
                    log.exception("predict_action failed on a request")
                    group[0].error = f"500:model failed on this request: {type(e).__name__}: {e}"
                else:  # find the failing request(s): the others in the batch still get their actions
                    log.warning("predict_action failed on a batch of %d (%s); retrying one by one", len(group), e)
                    for p in group:
                        try:
                            self._predict([p], key)
                        except Exception as e1:  # noqa: BLE001
                            p.error = f"500:model failed on this request: {type(e1).__name__}: {e1}"
            with self._lock:
                self._stats["model_calls"] += 1
                self._batch_sizes[len(group)] += 1
            for p in group:
                p.done.set()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when dozens of clients connect at once


def _handler_class(server: ActionServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a robot client reuses its connection
        disable_nagle_algorithm = True  # else each small reply waits ~40 ms on the client's delayed ACK
        timeout = 300  # seconds an idle keep-alive connection may hold a thread

        def log_message(self, fmt, *args):
            if server.access_log:
                log.info("%s %s", self.address_string(), fmt % args)

        def _reply(self, status: int, value: Any) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 405:
                self.send_header("Allow", "POST" if self.path.split("?")[0] == "/act" else "GET")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            # Counted before the body goes out: once a client holds its reply, stats include it.
            server._count("responses_%dxx" % (status // 100))
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, {"error": message})

        def _route(self, method: str) -> None:
            try:
                path = self.path.split("?")[0]
                want = {"/act": "POST", "/health": "GET"}.get(path)
                if want is None:
                    self._drain()
                    return self._error(404, f"unknown path {path!r}; endpoints: POST /act, GET /health")
                if method != want:
                    self._drain()
                    return self._error(405, f"{path} takes {want}, not {method}")
                if path == "/health":
                    return self._reply(200, server.health())
                self._act()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as e:  # noqa: BLE001 -- a handler bug answers 500, never kills the server
                log.exception("unhandled error in %s %s", method, self.path)
                self.close_connection = True
                try:
                    self._error(500, f"internal error: {type(e).__name__}: {e}")
                except OSError:
                    pass

        def _drain(self) -> None:
            """Reads the body of a request that will not be used, so the keep-alive stream stays in
            step; an oversized one is discarded and the connection closed."""
            n = self.headers.get("Content-Length")
            if n and n.strip().isdigit() and int(n) <= server.max_body_bytes:
                self.rfile.read(int(n))
            elif n:
                self._discard(int(n) if n.strip().isdigit() else 0)

        def _discard(self, n: int, budget_s: float = 5.0) -> None:
            """Reads and drops up to n body bytes (for at most budget_s), then marks the connection
            for closing. Closing with unread input would make the kernel send a reset, and the
            client could lose our error reply before reading it."""
            self.close_connection = True
            deadline = time.monotonic() + budget_s
            try:
                while n > 0 and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(n, 1 << 16))
                    if not chunk:
                        break
                    n -= len(chunk)
            except OSError:
                pass

        def _act(self) -> None:
            n = self.headers.get("Content-Length")
            if n is None or not n.strip().isdigit():
                self.close_connection = True  # the body's end is unknown: the stream cannot be reused
                return self._error(411, "POST /act needs a Content-Length header (no chunked bodies)")
            n = int(n)
            if n > server.max_body_bytes:
                self._discard(n)
                return self._error(413, f"body of {n} bytes exceeds the limit of {server.max_body_bytes}")
            body = self.rfile.read(n)
            try:
                pending, encoding = parse_act(body, server.vla.norm_stats)
            except BadRequest as e:
                return self._error(e.status, str(e))
            server._count("requests")
            server.submit(pending)
            if not pending.done.wait(server.request_timeout_s):
                return self._error(504, f"no answer within {server.request_timeout_s} s")
            if pending.error is not None:
                status, message = pending.error.split(":", 1)
                return self._error(int(status), message)
            assert pending.action is not None  # done without an error: the worker set the action
            self._reply(200, encode_action(pending.action, encoding))

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

        def do_PATCH(self):
            self._route("PATCH")

    return Handler
