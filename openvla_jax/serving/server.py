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
- `GET /health`: model facts, batching settings, compile progress, request and model-call counters;
  200 once every bucket is compiled ("status": "ok"), 503 before ("compiling") or if that failed.

Errors are JSON `{"error": message}`: 400 bad JSON / image (rank, shape, dtype, range) / instruction
(also: longer than `max_prompt_tokens`) / unnorm_key (the message lists the known keys), 401 no or
wrong bearer token, 404 unknown path, 405 wrong method, 408 body not received within
`body_timeout_s`, 411 no Content-Length, 413 body over `max_body_bytes` (answered from the header,
before any of the body is read), 500 the model raised on this request (a batch that fails is retried
request by request, so only the failing ones answer 500), 503 still compiling or shutting down (or,
from uvicorn as plain text, over `max_connections`), 504 no answer within `request_timeout_s`.

Start-up: the listening socket opens at once, and the batching worker first compiles every shape a
request can need (batch buckets 1, 2, 4 .. up to `max_batch`, times prompt-length buckets up to
`max_prompt_tokens`; a tqdm bar shows it), so no request ever waits on the compiler; until then
`/act` answers 503 and `/health` says how far it is. `start()` returns once ready (`wait=False`: at
once).

Batching: each request is validated and queued; one worker thread takes the first queued request,
keeps collecting until it holds `max_batch` of them or `max_wait_ms` has passed since that first one,
then calls `predict_action` once per `unnorm_key` in the batch and answers each request. `max_batch=1`
turns batching off. Rows of one batch cannot affect each other: `OpenVLA.predict_action` decodes each
row at its own length. The HTTP side (limits, token, timeouts) is `app.py`.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from openvla_jax.models.config import as_config
from openvla_jax.serving.wire import BadRequest, Pending, parse_act

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20  # a 1080p RGB frame as a JSON list is ~25 MB
MAX_PROMPT_TOKENS = 128  # OpenVLA prompts are ~20-40 tokens; each 16 more adds a row of compiles
LENGTH_BUCKET = 16  # policy.py pads prompts to a multiple of this


class ActionServer:
    """Serves `vla.predict_action(images, instructions, unnorm_key)` (any object with that method
    and a `norm_stats` dict) over HTTP. `port=0` picks a free port (see `.url`).

    An `OpenVLA` (anything with `decode_rows`, `max_prompt_tokens` and a `tokenizer`) is compiled
    for every bucket before the server is ready (`warmup=False` skips that), and a prompt over
    `max_prompt_tokens` (default the smaller of MAX_PROMPT_TOKENS and what the model's context
    leaves) is refused with a 400 before it reaches a batch.

    Limits: at most `max_connections` open connections (uvicorn answers 503 above), a request head
    must arrive within `header_timeout_s` and its body within `body_timeout_s`, bodies over
    `max_body_bytes` are refused from their Content-Length, and JSON parsing runs on `parse_workers`
    threads. `token`: every request must carry `Authorization: Bearer <token>` (401 otherwise)."""

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
        max_prompt_tokens: Optional[int] = None,
        warmup: bool = True,
        progress: bool = True,
        token: Optional[str] = None,
        max_connections: int = 256,
        parse_workers: int = 4,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
    ):
        for name, value, low in (
            ("max_batch", max_batch, 1),
            ("max_wait_ms", max_wait_ms, 0),
            ("max_connections", max_connections, 1),
            ("parse_workers", parse_workers, 1),
            ("max_body_bytes", max_body_bytes, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, value in (("header_timeout_s", header_timeout_s), ("body_timeout_s", body_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if token is not None and not token.strip():
            raise ValueError("token must be a non-empty string or None (no authentication)")
        extra = {k: getattr(vla, k) for k, d in (("num_images", 1), ("proprio_dim", 0)) if getattr(vla, k, d) != d}
        if extra:
            raise ValueError(
                f"the /act protocol carries one image and no robot state; this model has {extra} "
                "(OFT options): call OpenVLA.predict_action directly"
            )
        self.vla = vla
        self.max_batch, self.max_wait_ms = int(max_batch), float(max_wait_ms)
        self.max_body_bytes, self.request_timeout_s = int(max_body_bytes), float(request_timeout_s)
        self.access_log, self.progress, self.token = access_log, progress, token
        self.max_connections, self.parse_workers = int(max_connections), int(parse_workers)
        self.header_timeout_s, self.body_timeout_s = float(header_timeout_s), float(body_timeout_s)
        model_cap = getattr(vla, "max_prompt_tokens", None)
        if max_prompt_tokens is not None and max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be at least 2 (BOS and the space), got {max_prompt_tokens}")
        if max_prompt_tokens is not None and model_cap is not None and max_prompt_tokens > model_cap:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} exceeds what this model's context leaves ({model_cap})"
            )
        cap = max_prompt_tokens if max_prompt_tokens is not None else MAX_PROMPT_TOKENS
        self.max_prompt_tokens: Optional[int] = min(cap, model_cap) if model_cap is not None else max_prompt_tokens
        self.buckets = self._buckets() if warmup else []
        self._compiled = 0
        self.compile_s: Optional[float] = None  # wall time of warmup(), once done
        self._warmup_error: Optional[str] = None
        self._ready = threading.Event()
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = Counter()
        self._batch_sizes = Counter()
        self._threads: list[threading.Thread] = []
        self.parse_pool = ThreadPoolExecutor(self.parse_workers, thread_name_prefix="vla-parse")
        self._sock = _listen(host, port)
        bound = self._sock.getsockname()[0]
        if token is None and not ipaddress.ip_address(bound).is_loopback:
            log.warning(
                "serving on %s without a token: anyone who can reach this address can drive the robot; "
                "pass --token (or set OPENVLA_SERVE_TOKEN) or bind 127.0.0.1",
                bound,
            )
        from openvla_jax.serving.app import make_uvicorn

        self._uvicorn = make_uvicorn(self)

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @property
    def ready(self) -> bool:
        """Every bucket compiled, and not stopping: requests are taken."""
        return self._ready.is_set() and self._warmup_error is None and not self._stop.is_set()

    @property
    def not_ready_reason(self) -> str:
        if self._warmup_error is not None:
            return f"compiling failed ({self._warmup_error}); restart the server"
        if self._stop.is_set():
            return "server is shutting down"
        return f"compiling ({self._compiled} of {len(self.buckets)} buckets compiled); GET /health says when"

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, wait: bool = True) -> "ActionServer":
        """Starts the HTTP loop and the batching worker (which compiles first) in daemon threads;
        with `wait`, returns once every bucket is compiled (RuntimeError if compiling failed)."""
        http = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._sock]}, name="vla-http", daemon=True
        )
        worker = threading.Thread(target=self._worker, name="vla-batcher", daemon=True)
        for t in (http, worker):
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + 60
        while not self._uvicorn.started and http.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)  # connections queue on the listening socket meanwhile; this only orders logs
        if not http.is_alive():
            raise RuntimeError(f"the HTTP server on {self.url} failed to start (see the log above)")
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Blocks until every bucket is compiled; RuntimeError naming the cause if that failed."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"not ready after {timeout} s: compiled {self._compiled} of {len(self.buckets)} buckets")
        if self._warmup_error is not None:
            raise RuntimeError(f"compiling for the server failed: {self._warmup_error}")

    def serve_forever(self) -> None:
        """Blocks serving until KeyboardInterrupt (for scripts/serve.py)."""
        if not self._threads:
            self.start(wait=False)
        try:
            while not self._stop.is_set() and all(t.is_alive() for t in self._threads):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._ready.set()  # a wait_ready() caller is released (the worker sees _stop between buckets)
        self._answer_queued("503:server is shutting down")
        self._uvicorn.should_exit = True
        for t in self._threads:
            t.join(timeout=10)
        self._answer_queued("503:server is shutting down")  # anything queued meanwhile is not left hanging
        self.parse_pool.shutdown(wait=False, cancel_futures=True)
        self._sock.close()

    def _answer_queued(self, error: str) -> None:
        while True:
            try:
                p = self._queue.get_nowait()
            except queue.Empty:
                return
            p.error = error
            p.finish()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------------------- compiling
    def _buckets(self) -> list[tuple[int, int]]:
        """(batch, prompt length) shapes `predict_action` pads a request batch to: batch a power of
        two up to max_batch's, length a multiple of LENGTH_BUCKET from the shortest possible prompt
        (the template alone) up to max_prompt_tokens. Empty for a model that has no `decode_rows`."""
        vla = self.vla
        if not (hasattr(vla, "decode_rows") and self.max_prompt_tokens is not None):
            return []
        shortest = 1
        if getattr(vla, "tokenizer_dir", None) is not None:
            from openvla_jax.tokenizer.prompt import inference_prompt_ids

            shortest = len(inference_prompt_ids(vla.tokenizer, "")) - 1  # an instruction adds >= 0 tokens
        top = 1 << (self.max_batch - 1).bit_length()
        batches = [1 << i for i in range(top.bit_length())]
        first = max(1, -(-shortest // LENGTH_BUCKET))
        last = -(-self.max_prompt_tokens // LENGTH_BUCKET)
        return [(b, n * LENGTH_BUCKET) for n in range(first, last + 1) for b in batches]

    def warmup(self) -> None:
        """Compiles (and runs once) the decoder at every bucket in `self.buckets`, largest batch last
        so a batch that does not fit memory fails after the cheap ones have shown the setup works."""
        if not self.buckets:
            return
        from tqdm import tqdm

        vla = self.vla
        pixels = vla._preprocess([np.zeros((8, 8, 3), np.uint8)])  # [1, S, S, 6], the dtype requests get
        t0 = time.perf_counter()
        bar = tqdm(self.buckets, desc="compiling", unit="bucket", disable=not self.progress, leave=True)
        for b, length in bar:
            if self._stop.is_set():
                return
            bar.set_postfix_str(f"batch {b} x {length} tokens", refresh=False)
            vla.decode_rows(np.repeat(pixels, b, axis=0), [[1] * length] * b)
            self._compiled += 1
        bar.close()
        self.compile_s = time.perf_counter() - t0
        log.info("compiled %d buckets in %.1f s", len(self.buckets), self.compile_s)

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
        if self._warmup_error is not None:
            status = "failed"
        else:
            status = "ok" if self.ready else "stopping" if self._stop.is_set() else "compiling"
        out = {
            "status": status,
            "ready": status == "ok",
            "compiled": {"buckets": len(self.buckets), "done": self._compiled},
            "model": {
                "class": type(vla).__name__,
                "variant": as_config(config).variant if config is not None else None,
                "action_dim": getattr(vla, "action_dim", None),
                "dtype": dtype,
                "unnorm_keys": sorted(vla.norm_stats),
            },
            "batching": {"enabled": self.max_batch > 1, "max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms},
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_body_bytes": self.max_body_bytes,
            "stats": self.stats(),
        }
        if self._warmup_error is not None:
            out["error"] = self._warmup_error
        return out

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # ------------------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> tuple[Pending, str]:
        """A `/act` body -> (queued request, reply encoding), or BadRequest; runs on `parse_pool`."""
        pending, encoding = parse_act(body, self.vla.norm_stats)
        if self.max_prompt_tokens is not None and getattr(self.vla, "tokenizer_dir", None) is not None:
            from openvla_jax.tokenizer.prompt import inference_prompt_ids

            n = len(inference_prompt_ids(self.vla.tokenizer, pending.instruction))
            if n > self.max_prompt_tokens:
                raise BadRequest(
                    f"'instruction' is {n} prompt tokens; this server takes at most {self.max_prompt_tokens} "
                    "(its max_prompt_tokens: every length up to it is compiled before serving)"
                )
        return pending, encoding

    # ------------------------------------------------------------------------------ batching
    def submit(self, pending: Pending) -> None:
        if self._stop.is_set():
            pending.error = "503:server is shutting down"
            pending.finish()
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
        try:
            self.warmup()
        except Exception as e:  # noqa: BLE001 -- reported by /health and wait_ready, not a dead thread
            log.exception("compiling the server's buckets failed")
            self._warmup_error = f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._ready.set()
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
                p.finish()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound now, so `.url` (port 0: the port picked) is known before start
    and a port in use fails here, naming it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # dozens of clients connecting at once must not be refused by a short backlog
    return sock
