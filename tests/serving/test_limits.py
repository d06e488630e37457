"""The server's limits on loopback, with a stub model: it is not ready (and says so) until every
bucket is compiled; half-open connections cost no thread and are closed on time; an absurd body is
refused from its header; the bearer token; the connection cap."""

import http.client
import logging
import socket
import threading
import time

import numpy as np
import pytest

from openvla_jax.serving.client import ActionClient, ServerError
from openvla_jax.serving.server import ActionServer
from tests.serving.test_server import Stub, raw


class Compiling(Stub):
    """A stub whose 'compiling' (decode_rows) records each bucket and waits until released."""

    max_prompt_tokens = 40
    tokenizer_dir = None

    def __init__(self, fail=False):
        super().__init__()
        self.release, self.shapes, self.fail = threading.Event(), [], fail

    def _preprocess(self, images):
        return np.zeros((len(images), 4, 4, 6), np.float32)

    def decode_rows(self, pixel_values, rows, proprio=None):
        assert self.release.wait(30)
        if self.fail:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory at batch 4")
        assert len(pixel_values) == len(rows)
        self.shapes.append((len(rows), max(map(len, rows))))


def address(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def test_health_is_503_and_act_refused_until_every_bucket_is_compiled():
    model = Compiling()
    server = ActionServer(model, port=0, max_batch=3, max_prompt_tokens=40, progress=False).start(wait=False)
    try:
        status, h = raw(server.url, "GET", "/health")
        assert (status, h["status"], h["ready"]) == (503, "compiling", False)
        assert h["compiled"] == {"buckets": 9, "done": 0}
        img = np.zeros((4, 4, 3), np.uint8).tolist()
        status, got = raw(
            server.url, "POST", "/act", f'{{"image": {img}, "instruction": "go 1", "unnorm_key": "fractal"}}'
        )
        assert status == 503 and "not ready: compiling (0 of 9 buckets compiled)" in got["error"]
        assert model.calls == []
        model.release.set()
        server.wait_ready(timeout=30)
        status, h = raw(server.url, "GET", "/health")
        assert (status, h["status"], h["ready"], h["compiled"]["done"]) == (200, "ok", True, 9)
        # batch buckets up to max_batch's power of two, every prompt length bucket up to the cap
        assert model.shapes == [(b, t) for t in (16, 32, 48) for b in (1, 2, 4)]
        np.testing.assert_array_equal(
            ActionClient(server.url).act(np.zeros((4, 4, 3), np.uint8), "go 1", "fractal")[:2], [0, 1]
        )
    finally:
        server.stop()


def test_a_failed_compile_is_reported_not_served():
    model = Compiling(fail=True)
    model.release.set()
    server = ActionServer(model, port=0, max_batch=2, progress=False)
    try:
        with pytest.raises(RuntimeError, match="compiling for the server failed: MemoryError: RESOURCE_EXHAUSTED"):
            server.start()
        status, h = raw(server.url, "GET", "/health")
        assert (status, h["status"]) == (503, "failed") and "RESOURCE_EXHAUSTED" in h["error"]
        status, got = raw(server.url, "POST", "/act", '{"image": [[[1, 2, 3]]], "instruction": "go 1"}')
        assert status == 503 and "compiling failed (MemoryError: RESOURCE_EXHAUSTED" in got["error"]
    finally:
        server.stop()


def test_200_half_open_connections_neither_block_a_client_nor_hold_threads():
    """Before: a thread per connection (200 threads here), each waiting up to 300 s for its request."""
    with ActionServer(Stub(), port=0, max_batch=1, header_timeout_s=1.0, body_timeout_s=1.0) as server:
        client = ActionClient(server.url)
        img = np.zeros((4, 4, 3), np.uint8)
        client.act(img, "go 0", "fractal")
        threads = threading.active_count()
        socks = []
        for i in range(200):  # even: a head that never ends; odd: a body that never comes
            s = socket.create_connection(address(server), timeout=15)
            s.sendall(
                b"POST /act HTTP/1.1\r\nHost: x\r\n"
                if i % 2 == 0
                else b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{"
            )
            socks.append(s)
        t = time.perf_counter()
        np.testing.assert_array_equal(client.act(img, "go 7", "fractal")[:2], [0, 7])
        assert time.perf_counter() - t < 2.0
        assert threading.active_count() - threads < 10, f"{threading.active_count() - threads} more threads"
        t = time.perf_counter()
        for i, s in enumerate(socks):  # the server closes each within its timeout
            reply = b"".join(iter(lambda: s.recv(4096), b""))
            s.close()
            assert reply == b"" if i % 2 == 0 else reply.startswith(b"HTTP/1.1 408"), (i, reply[:60])
        assert time.perf_counter() - t < 8.0
        assert client.act(img, "go 8", "fractal")[1] == 8


def test_an_absurd_content_length_is_refused_from_the_header():
    """Before: the server tried to read the body for 5 s before answering 413."""
    with ActionServer(Stub(), port=0, max_batch=1, max_body_bytes=50_000) as server:
        with socket.create_connection(address(server), timeout=15) as s:
            t = time.perf_counter()
            s.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n{")
            head = s.recv(4096)
            took = time.perf_counter() - t
            rest = b"".join(iter(lambda: s.recv(4096), b""))  # then the server closes the connection
        assert head.startswith(b"HTTP/1.1 413") and b"1000000000000 bytes exceeds the limit of 50000" in head + rest
        assert took < 1.0, f"413 after {took:.2f} s"
        assert ActionClient(server.url).act(np.zeros((4, 4, 3), np.uint8), "go 2", "fractal")[1] == 2


def test_a_token_is_required_when_set(caplog):
    body = '{"image": [[[1, 2, 3]]], "instruction": "go 3", "unnorm_key": "fractal"}'
    with ActionServer(Stub(), port=0, max_batch=1, token="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            for method, path in (("POST", "/act"), ("GET", "/health"), ("GET", "/nope")):
                status, got = raw(server.url, method, path, body if method == "POST" else b"", headers)
                assert status == 401 and "Authorization: Bearer <token>" in got["error"], (headers, path)
        status, got = raw(server.url, "POST", "/act", body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and got[:2] == [1, 3]
        assert ActionClient(server.url, token="s3cret").health()["status"] == "ok"
        with pytest.raises(ServerError, match="HTTP 401"):
            ActionClient(server.url).act(np.zeros((4, 4, 3), np.uint8), "go 3", "fractal")
    with caplog.at_level(logging.WARNING, logger="openvla_jax.serving.server"):
        ActionServer(Stub(), host="0.0.0.0", port=0, token="s3cret").stop()
        assert not caplog.records
        ActionServer(Stub(), host="0.0.0.0", port=0).stop()
    assert "serving on 0.0.0.0 without a token" in caplog.text


def test_connections_over_the_cap_get_503_until_some_close():
    with ActionServer(Stub(), port=0, max_batch=1, max_connections=4) as server:
        idle = [socket.create_connection(address(server), timeout=15) for _ in range(4)]
        time.sleep(0.2)  # the event loop accepts them
        conn = http.client.HTTPConnection(*address(server), timeout=15)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()
        for s in idle:
            s.close()
        client, deadline = ActionClient(server.url), time.monotonic() + 5
        while True:
            try:
                assert client.act(np.zeros((4, 4, 3), np.uint8), "go 4", "fractal")[1] == 4
                break
            except ServerError as e:
                assert e.status == 503 and time.monotonic() < deadline
                time.sleep(0.05)
