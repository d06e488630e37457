"""The HTTP side of `ActionServer`: a small ASGI app under uvicorn (h11), and the server's limits.

uvicorn gives an event loop (a half-open connection costs a socket, not a thread), a connection cap
(`limit_concurrency`: 503 above it), keep-alive timeouts and a bounded request head (h11: 16 KB).
It has no timeout for a request head that never completes (slowloris), so `_protocol` adds one;
the body timeout, the body limit (from Content-Length, before reading), the bearer token and the
bounded JSON parsing pool are here. The batching itself stays on `ActionServer`'s worker thread: a
handler queues its request and awaits a future the worker resolves through `Pending.notify`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from openvla_jax.serving.wire import BadRequest, encode_action

log = logging.getLogger(__name__)

DRAIN_S = 1.0  # after a 413, how long unread body bytes are read and dropped before closing


def make_uvicorn(server) -> uvicorn.Server:
    config = uvicorn.Config(
        App(server),
        http=_protocol(server.header_timeout_s),
        lifespan="off",
        log_config=None,  # leave the application's logging alone
        access_log=server.access_log,
        limit_concurrency=server.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    return uvicorn.Server(config)


def _protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HeaderTimeoutProtocol(H11Protocol):
        """Closes a connection whose next request head has not fully arrived `header_timeout_s`
        after it opened or after its previous reply: uvicorn only times out a connection that
        sends nothing, so one byte now and then would hold a connection slot forever."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            cycle = self.cycle  # a new request head replaces it; then the body timeout takes over

            def expire():
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self._header_timer = self.loop.call_later(header_timeout_s, expire)

    return HeaderTimeoutProtocol


class App:
    """ASGI app: `POST /act`, `GET /health` (see `server.py` for the protocol and status codes)."""

    def __init__(self, server):
        self.server = server
        self.token = server.token.encode() if server.token is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except Exception as e:  # noqa: BLE001 -- a handler bug answers 500, never kills the server
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            try:
                await self._reply(send, 500, {"error": f"internal error: {type(e).__name__}: {e}"}, close=True)
            except Exception:  # noqa: BLE001 -- the reply had already started
                pass

    async def _reply(self, send, status: int, value: Any, close: bool = False, headers=(), more: bool = False) -> None:
        body = json.dumps(value).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
        if close:
            head.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": head})
        # Counted before the body goes out: once a client holds its reply, stats include it.
        self.server._count("responses_%dxx" % (status // 100))
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _error(self, send, status: int, message: str, **kw) -> None:
        await self._reply(send, status, {"error": message}, **kw)

    async def _route(self, scope, receive, send) -> None:
        server, path, method = self.server, scope["path"], scope["method"]
        headers = dict(scope["headers"])
        if self.token is not None:
            auth = headers.get(b"authorization", b"")
            if not (auth.startswith(b"Bearer ") and hmac.compare_digest(auth[7:].strip(), self.token)):
                return await self._error(
                    send,
                    401,
                    "missing or wrong token: send 'Authorization: Bearer <token>'",
                    headers=[(b"www-authenticate", b'Bearer realm="openvla"')],
                )
        want = {"/act": "POST", "/health": "GET"}.get(path)
        if want is None:
            return await self._error(send, 404, f"unknown path {path!r}; endpoints: POST /act, GET /health")
        if method != want:
            allow = [(b"allow", want.encode())]
            return await self._error(send, 405, f"{path} takes {want}, not {method}", headers=allow)
        if path == "/health":
            health = server.health()
            return await self._reply(send, 200 if health["ready"] else 503, health)
        if not server.ready:
            return await self._error(send, 503, f"not ready: {server.not_ready_reason}")
        await self._act(headers, receive, send)

    async def _act(self, headers: dict, receive, send) -> None:
        server = self.server
        n = headers.get(b"content-length", b"").strip()
        if not n.isdigit() or b"transfer-encoding" in headers:
            # the body's end is unknown to us: the stream cannot be reused
            return await self._error(
                send, 411, "POST /act needs a Content-Length header (no chunked bodies)", close=True
            )
        n = int(n)
        if n > server.max_body_bytes:
            message = f"body of {n} bytes exceeds the limit of {server.max_body_bytes}"
            await self._error(send, 413, message, close=True, more=True)  # the client has its answer now
            return await self._finish_after_drain(receive, send, n)
        body = await self._read_body(receive, n)
        if body is None:
            message = f"request body not received within {server.body_timeout_s} s"
            return await self._error(send, 408, message, close=True)
        loop = asyncio.get_running_loop()
        try:
            pending, encoding = await loop.run_in_executor(server.parse_pool, server.parse, body)
        except BadRequest as e:
            return await self._error(send, e.status, str(e))
        server._count("requests")
        answered = loop.create_future()
        pending.notify = lambda: loop.call_soon_threadsafe(_resolve, answered)
        server.submit(pending)
        try:
            await asyncio.wait_for(answered, server.request_timeout_s)
        except asyncio.TimeoutError:
            return await self._error(send, 504, f"no answer within {server.request_timeout_s} s")
        if pending.error is not None:
            status, message = pending.error.split(":", 1)
            return await self._error(send, int(status), message)
        assert pending.action is not None  # finished without an error: the worker set the action
        await self._reply(send, 200, encode_action(pending.action, encoding))

    async def _read_body(self, receive, n: int) -> bytes | None:
        """The body (n bytes), or None if it did not all arrive within body_timeout_s."""
        chunks, got = [], 0
        deadline = time.monotonic() + self.server.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            got += len(chunks[-1])
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _finish_after_drain(self, receive, send, n: int) -> None:
        """Reads and drops what the client is still sending (for at most DRAIN_S): closing with
        unread input makes the kernel send a reset, and the client could lose the 413 before reading
        it. A client that sends nothing more is closed after DRAIN_S."""
        deadline = time.monotonic() + DRAIN_S
        try:
            while time.monotonic() < deadline:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # a request that timed out (504) no longer waits
        future.set_result(None)
