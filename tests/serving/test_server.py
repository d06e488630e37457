"""The action server on loopback: concurrent clients get exactly what direct `predict_action` calls
give, batching really batches, every bad request gets its 4xx (and the server keeps answering), the
plain / json-numpy / encoded forms agree, and the json-numpy codec matches a hand encoding."""

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks.serve import bench_server
from openvla_jax import OpenVLA
from openvla_jax.serving import jsonnp
from openvla_jax.serving.client import ActionClient, ServerError
from openvla_jax.serving.server import ActionServer
from tests.support.rlds_fixtures import INSTRUCTIONS, train_tiny_sentencepiece
from tests.support.vla_refs import NORM_STATS, build_torch_vla, write_hf_dir

ROOT = Path(__file__).resolve().parents[2]
# A second dataset with other bounds, so the unnorm_key routing shows in the values.
FRACTAL = {"action": {**NORM_STATS["bridge_orig"]["action"], "q01": [-0.2] * 7, "q99": [0.4] * 7}}
STATS = {**NORM_STATS, "fractal": FRACTAL}
KEYS = ["bridge_orig", "fractal"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_hf_dir(build_torch_vla(), path, norm_stats=STATS)
    shutil.copy(Path(train_tiny_sentencepiece(str(tmp_path_factory.mktemp("tok")))) / "tokenizer.model", path)
    return path


@pytest.fixture(scope="module")
def vla(ckpt):
    """The tiny OpenVLA with its action-token logits scaled up: random weights otherwise pick one
    non-action token for every input, so every action would be equal and a mix-up would not show."""
    base = OpenVLA.load(ckpt, dtype="float32")
    params = jax.tree.map(np.array, base.params)
    params["language_model"]["lm_head"]["kernel"][:, 31744:32000] *= 30.0
    return OpenVLA(base.config, params, STATS, base.tokenizer_dir, "float32")


class Counting:
    """Wraps a model; records every predict_action batch size (independently of the server's stats)."""

    def __init__(self, model):
        self.model, self.norm_stats, self.calls = model, model.norm_stats, []

    def predict_action(self, images, instructions, unnorm_key=None):
        self.calls.append(len(images))
        return self.model.predict_action(images, instructions, unnorm_key=unnorm_key)


class Stub:
    """Action = [image value, request number, len(instruction), dataset index, 0, 0, 0]: each answer
    names the request it belongs to. Raises when asked to 'explode'."""

    norm_stats = STATS

    def __init__(self, delay_s=0.0):
        self.delay_s, self.calls = delay_s, []

    def predict_action(self, images, instructions, unnorm_key=None):
        self.calls.append(len(images))
        time.sleep(self.delay_s)
        if "explode" in instructions:
            raise RuntimeError("boom")
        return np.array(
            [
                [
                    img[0, 0, 0],
                    int(s.split()[-1]) if s.split()[-1].isdigit() else -1,
                    len(s),
                    KEYS.index(unnorm_key) if unnorm_key else -1,
                    0,
                    0,
                    0,
                ]
                for img, s in zip(images, instructions)
            ],
            np.float64,
        )


def run_threads(n, fn):
    """Runs fn(i) in n threads released together; returns their results (exceptions re-raised)."""
    barrier, out, errors = threading.Barrier(n), [None] * n, []

    def wrap(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]
    return out


def raw(url, method, path, body=b"", headers=None):
    """One request on a fresh connection -> (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def image(rng, h=40, w=56):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------- the codec
def test_jsonnp_matches_a_hand_encoding_and_refuses_bad_arrays():
    a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    hand = {"__numpy__": base64.b64encode(bytes(range(24))).decode(), "dtype": "|u1", "shape": [2, 4, 3]}
    assert jsonnp.encode_array(a) == hand
    assert json.loads(jsonnp.dumps({"image": a}))["image"] == hand
    x = np.array([0.5, -1.25], "<f8")
    got = jsonnp.loads(
        json.dumps({"a": {"__numpy__": base64.b64encode(x.tobytes()).decode(), "dtype": "<f8", "shape": [2]}})
    )
    np.testing.assert_array_equal(got["a"], x)
    assert jsonnp.loads(jsonnp.dumps(np.float32(3.5))).shape == ()  # a scalar keeps shape []
    assert jsonnp.loads('{"__numpy__": "AAEC", "dtype": "uint8", "shape": [3]}').tolist() == [
        0,
        1,
        2,
    ]  # old dtype names
    for bad, match in [
        ({"__numpy__": "AAEC", "dtype": "|u1", "shape": [2, 2]}, "3 bytes do not hold shape"),
        ({"__numpy__": "!!!", "dtype": "|u1", "shape": [3]}, "not valid base64"),
        ({"__numpy__": "AAEC", "dtype": "|O", "shape": [3]}, "not a plain numeric dtype"),
        ({"__numpy__": "AAEC", "dtype": "nope", "shape": [3]}, "unknown dtype"),
        ({"__numpy__": "AAEC", "dtype": "|u1", "shape": [-3]}, "non-negative ints"),
    ]:
        with pytest.raises(ValueError, match=match):
            jsonnp.loads(json.dumps(bad))


# ---------------------------------------------------------------------------- the real model
def test_concurrent_clients_get_the_actions_of_direct_calls_and_are_batched(vla):
    model = Counting(vla)
    rng = np.random.default_rng(0)
    n, per = 12, 3
    reqs = [
        [
            (image(rng, 40 + 8 * (i % 3), 56), INSTRUCTIONS[(i + r) % len(INSTRUCTIONS)], KEYS[(i + r) % 2])
            for r in range(per)
        ]
        for i in range(n)
    ]
    encodings = ["json_numpy", "list", "encoded"]
    with ActionServer(model, port=0, max_batch=8, max_wait_ms=100) as server:
        client = ActionClient(server.url)
        got = run_threads(n, lambda i: [client.act(*req, encoding=encodings[i % 3]) for req in reqs[i]])
        stats = server.stats()
    got = np.array(got)  # [clients, requests, 7]
    assert got.shape == (n, per, 7)
    want = np.array([[vla.predict_action(img, s, unnorm_key=k)[0] for img, s, k in rs] for rs in reqs])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(np.unique(want.reshape(-1, 7), axis=0)) >= 6, "actions barely depend on the input: test too weak"
    # nothing lost, and batched: fewer model calls than requests, some with several rows
    assert sum(model.calls) == n * per == stats["requests"] == stats["responses_2xx"]
    assert len(model.calls) == stats["model_calls"] < n * per
    assert max(model.calls) > 1 and max(model.calls) <= 8


def test_batching_off_is_one_call_per_request(vla):
    model = Counting(vla)
    rng = np.random.default_rng(1)
    reqs = [(image(rng), INSTRUCTIONS[i % 5], "bridge_orig") for i in range(8)]
    with ActionServer(model, port=0, max_batch=1, max_wait_ms=50) as server:
        client = ActionClient(server.url)
        got = run_threads(8, lambda i: client.act(*reqs[i]))
    assert model.calls == [1] * 8
    want = np.concatenate([vla.predict_action(img, s, unnorm_key=k) for img, s, k in reqs])
    np.testing.assert_allclose(np.array(got), want, rtol=0, atol=1e-6)


def test_plain_json_numpy_and_encoded_forms_agree_on_the_wire(vla):
    rng = np.random.default_rng(2)
    img, text = image(rng), "open the drawer"
    want = vla.predict_action(img, text, unnorm_key="fractal")[0]
    with ActionServer(vla, port=0, max_batch=4, max_wait_ms=1, warmup=False) as server:
        hand = {"__numpy__": base64.b64encode(img.tobytes()).decode(), "dtype": "|u1", "shape": list(img.shape)}
        s, as_np = raw(
            server.url, "POST", "/act", json.dumps({"image": hand, "instruction": text, "unnorm_key": "fractal"})
        )
        assert s == 200 and as_np["dtype"] == "<f8" and as_np["shape"] == [7]  # json-numpy in, json-numpy out
        s, as_list = raw(
            server.url,
            "POST",
            "/act",
            json.dumps({"image": img.tolist(), "instruction": text, "unnorm_key": "fractal"}),
        )
        assert s == 200 and isinstance(as_list, list) and len(as_list) == 7  # plain in, plain out
        inner = json.dumps({"image": hand, "instruction": text, "unnorm_key": "fractal"})
        s, as_str = raw(server.url, "POST", "/act", json.dumps({"encoded": inner}))
        assert s == 200 and isinstance(as_str, str)  # double-encoded in, a JSON string out (as the original)
        client = ActionClient(server.url)
        via_client = [client.act(img, text, "fractal", encoding=e) for e in ("json_numpy", "list", "encoded")]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(as_np["__numpy__"]), "<f8"), want)
    np.testing.assert_array_equal(np.array(as_list), want)
    np.testing.assert_array_equal(jsonnp.loads(as_str), want)
    for v in via_client:
        np.testing.assert_array_equal(v, want)


def _bad_requests(img):
    hand = lambda a: {"__numpy__": base64.b64encode(a.tobytes()).decode(), "dtype": a.dtype.str, "shape": list(a.shape)}  # noqa: E731
    ok = {"instruction": "open the drawer", "unnorm_key": "bridge_orig"}
    post = lambda body: ("POST", "/act", json.dumps(body).encode())  # noqa: E731
    return [
        ("malformed JSON", ("POST", "/act", b'{"image": [[[1, 2'), 400, "malformed JSON"),
        ("not UTF-8", ("POST", "/act", b"\xff\xfe{}"), 400, "malformed JSON"),
        ("body not an object", post([1, 2, 3]), 400, "must be a JSON object"),
        ("no image", post(ok), 400, "missing 'image'"),
        ("rank-2 image", post({"image": img[..., 0].tolist(), **ok}), 400, "shape [H, W, 3]"),
        ("RGBA image", post({"image": hand(np.zeros((8, 8, 4), np.uint8)), **ok}), 400, "got shape [8, 8, 4]"),
        ("rank-4 image", post({"image": hand(img[None]), **ok}), 400, "got shape [1, 12, 16, 3]"),
        ("empty image", post({"image": hand(np.zeros((0, 8, 3), np.uint8)), **ok}), 400, "height and width"),
        ("float32 image", post({"image": hand(img.astype(np.float32)), **ok}), 400, "dtype uint8, got float32"),
        ("float list image", post({"image": (img / 255).tolist(), **ok}), 400, "integers 0..255"),
        ("out-of-range image", post({"image": (img.astype(int) + 200).tolist(), **ok}), 400, "0..255, got"),
        ("ragged image", post({"image": [[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]], **ok}), 400, "rectangular"),
        ("string image", post({"image": "abc", **ok}), 400, "got str"),
        ("bad base64", post({"image": {"__numpy__": "!!", "dtype": "|u1", "shape": [1, 1, 3]}, **ok}), 400, "base64"),
        ("no instruction", post({"image": img.tolist(), "unnorm_key": "bridge_orig"}), 400, "'instruction' must be"),
        (
            "instruction not a string",
            post({"image": img.tolist(), "instruction": 7, "unnorm_key": "fractal"}),
            400,
            "'instruction' must be",
        ),
        (
            "unknown unnorm_key",
            post({"image": img.tolist(), "instruction": "go", "unnorm_key": "nope"}),
            400,
            "unnorm_key 'nope' not in norm_stats; available: ['bridge_orig', 'fractal']",
        ),
        (
            "unnorm_key needed",
            post({"image": img.tolist(), "instruction": "go"}),
            400,
            "pass unnorm_key= one of ['bridge_orig', 'fractal']",
        ),
        (
            "unnorm_key not a string",
            post({"image": img.tolist(), "instruction": "go", "unnorm_key": 3}),
            400,
            "'unnorm_key' must be",
        ),
        ("encoded plus other keys", post({"encoded": "{}", "image": 1}), 400, "no other keys"),
        ("encoded not JSON", post({"encoded": "{nope"}), 400, "malformed JSON in 'encoded'"),
        ("unknown path", ("POST", "/predict", b"{}"), 404, "unknown path '/predict'"),
        ("GET /act", ("GET", "/act", b""), 405, "/act takes POST, not GET"),
        ("PUT /act", ("PUT", "/act", b"{}"), 405, "/act takes POST, not PUT"),
        ("POST /health", ("POST", "/health", b"{}"), 405, "/health takes GET, not POST"),
        (
            "too large",
            post({"image": np.zeros((128, 128, 3), np.uint8).tolist(), **ok}),
            413,
            "exceeds the limit of 50000",
        ),
    ]


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_answering(vla):
    rng = np.random.default_rng(3)
    img = image(rng, 12, 16)
    model = Counting(vla)
    with ActionServer(model, port=0, max_batch=4, max_wait_ms=1, max_body_bytes=50_000) as server:
        client = ActionClient(server.url)
        first = client.act(img, "open the drawer", "bridge_orig")
        for name, (method, path, body), status, message in _bad_requests(img):
            got_status, got = raw(server.url, method, path, body)
            assert (got_status, set(got)) == (status, {"error"}), (name, got_status, got)
            assert message in got["error"], (name, got["error"])
            np.testing.assert_array_equal(client.act(img, "open the drawer", "bridge_orig"), first)  # still serving
        # no Content-Length: the body's end is unknown, so 411 and the connection closes
        with socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=30) as sock:
            sock.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = sock.makefile("rb").read().decode()
        assert reply.startswith("HTTP/1.0 411") or reply.startswith("HTTP/1.1 411"), reply[:80]
        assert "Content-Length" in reply
        with pytest.raises(ServerError, match="HTTP 400: .*nope") as e:
            client.act(img, "go", unnorm_key="nope")
        assert e.value.status == 400
        stats = server.stats()
    n_bad = len(_bad_requests(img)) + 2
    assert model.calls == [1] * (len(_bad_requests(img)) + 1)  # bad requests never reach the model
    assert stats["responses_4xx"] == n_bad and stats.get("responses_5xx", 0) == 0


# ------------------------------------------------------------------------------- the stub model
def test_answers_go_to_their_own_request_under_load():
    model = Stub(delay_s=0.01)
    n, per = 16, 4
    with ActionServer(model, port=0, max_batch=8, max_wait_ms=20) as server:
        client = ActionClient(server.url)

        def run(i):
            img = np.full((4, 4, 3), i, np.uint8)
            return [
                client.act(img, f"go {r}", KEYS[(i + r) % 2], encoding=("list", "json_numpy")[r % 2])
                for r in range(per)
            ]

        got = np.array(run_threads(n, run))
    want = np.array([[[i, r, len(f"go {r}"), (i + r) % 2, 0, 0, 0] for r in range(per)] for i in range(n)], float)
    np.testing.assert_array_equal(got, want)
    assert sum(model.calls) == n * per and len(model.calls) < n * per


def test_a_model_exception_fails_only_its_request():
    model = Stub(delay_s=0.05)
    with ActionServer(model, port=0, max_batch=4, max_wait_ms=200) as server:
        client = ActionClient(server.url)
        img = np.full((4, 4, 3), 9, np.uint8)

        def run(i):  # same batch, two unnorm_key groups: the exploding request fails, its batch-mate does not
            try:
                return client.act(img, "explode" if i == 0 else "go 5", KEYS[0] if i < 2 else KEYS[1])
            except ServerError as e:
                return e

        got = run_threads(3, run)
        assert isinstance(got[0], ServerError) and got[0].status == 500 and "RuntimeError: boom" in got[0].message
        np.testing.assert_array_equal(got[1], [9, 5, 4, 0, 0, 0, 0])  # batched with it: retried alone
        assert sorted(model.calls[:4]) == [1, 1, 1, 2]  # the failed batch of 2, then each request alone
        np.testing.assert_array_equal(got[2], [9, 5, 4, 1, 0, 0, 0])
        np.testing.assert_array_equal(client.act(img, "go 6", KEYS[0]), [9, 6, 4, 0, 0, 0, 0])  # worker alive
        assert server.stats()["batch_sizes"] == {1: 2, 2: 1}


def test_health_reports_model_batching_and_counters(vla):
    with ActionServer(vla, port=0, max_batch=16, max_wait_ms=3, warmup=False) as server:
        client = ActionClient(server.url)
        client.act(np.zeros((8, 8, 3), np.uint8), "open the drawer", "fractal")
        h = client.health()
    assert h["status"] == "ok"
    assert h["model"] == {
        "class": "OpenVLA",
        "variant": "hf",  # loaded from an HF config.json
        "action_dim": 7,
        "dtype": "float32",
        "unnorm_keys": KEYS,
    }
    assert h["batching"] == {"enabled": True, "max_batch": 16, "max_wait_ms": 3.0}
    assert h["stats"]["requests"] == 1 and h["stats"]["model_calls"] == 1 and h["stats"]["batch_sizes"] == {"1": 1}


def test_binds_loopback_by_default_and_checks_settings():
    server = ActionServer(Stub(), port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.stop()
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ActionServer(Stub(), port=0, max_batch=0)


def test_bench_rows_count_every_request_and_batching_helps_a_slow_model():
    rows = bench_server(
        Stub(delay_s=0.02),
        clients=(1, 8),
        requests_per_client=4,
        max_batch=8,
        max_wait_ms=5,
        image_hw=(8, 8),
        unnorm_key="fractal",
    )
    assert [(r["batching"], r["clients"], r["requests"]) for r in rows] == [
        (True, 1, 4),
        (True, 8, 32),
        (False, 1, 4),
        (False, 8, 32),
    ]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["throughput_rps"] > 0
    on8, off8 = rows[1], rows[3]
    assert off8["model_calls"] == 32 and on8["model_calls"] < 32 and on8["mean_batch"] > 1
    assert on8["throughput_rps"] > 1.5 * off8["throughput_rps"]  # 20 ms per call, whatever the batch


# ------------------------------------------------------------------------------------- the script
def test_serve_script_serves_a_checkpoint(ckpt):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "serve.py"),
            f"--checkpoint={ckpt}",
            "--port=0",
            "--dtype=float32",
            "--max_batch=2",
            "--max_prompt_tokens=32",
            "--nowarmup",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OPENVLA_SERVE_TOKEN": "t0ken"},
    )
    try:
        url, lines = None, []
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving on "):
                url = line.split()[2]
        assert url is not None, "".join(lines[-20:])
        with pytest.raises(ServerError, match="HTTP 401"):
            ActionClient(url).health()
        client = ActionClient(url, token="t0ken")
        h = client.health()
        assert h["batching"]["max_batch"] == 2 and h["max_prompt_tokens"] == 32
        assert client.act(np.zeros((8, 8, 3), np.uint8), "open the drawer", "fractal").shape == (7,)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_reply_does_not_wait_on_delayed_acks():
    """Headers and body are two sends; without TCP_NODELAY the second waits ~40 ms for the client's
    delayed ACK, on every request."""
    with ActionServer(Stub(), port=0, max_batch=1) as server:
        client = ActionClient(server.url)
        img = np.zeros((4, 4, 3), np.uint8)
        times = []
        for r in range(20):
            t = time.perf_counter()
            client.act(img, f"go {r}", "fractal")
            times.append(time.perf_counter() - t)
    assert np.median(times) < 0.025, f"median round trip {1e3 * np.median(times):.1f} ms"


# ------------------------------------------------------------------- compiling before serving
class Prompted(Counting):
    """Counting, plus what lets the server count prompt tokens (but nothing for it to compile)."""

    def __init__(self, model):
        super().__init__(model)
        self.tokenizer_dir, self.tokenizer = model.tokenizer_dir, model.tokenizer
        self.max_prompt_tokens = model.max_prompt_tokens


def test_an_over_long_instruction_fails_alone_and_never_reaches_a_batch(vla):
    """Before: a prompt past the context failed its whole batch (then 500 after a retry); one past the
    server's cap but inside the context was served after compiling a new bucket, stalling the rest."""
    model = Prompted(vla)
    rng = np.random.default_rng(4)
    img = image(rng)
    texts = ["open the drawer", "pick up the block " * 4000, "put the spoon in the pot", "go " * 30]
    with ActionServer(model, port=0, max_batch=4, max_wait_ms=300, max_prompt_tokens=32) as server:
        client = ActionClient(server.url)

        def run(i):
            try:
                return client.act(img, texts[i], "bridge_orig")
            except ServerError as e:
                return e

        got = run_threads(len(texts), run)
    for i in (1, 3):  # the long ones: 400 naming the cap
        assert isinstance(got[i], ServerError) and got[i].status == 400, got[i]
        assert "this server takes at most 32" in got[i].message
    for i in (0, 2):  # the valid ones: their own actions
        np.testing.assert_array_equal(got[i], vla.predict_action(img, texts[i], unnorm_key="bridge_orig")[0])
    assert sum(model.calls) == 2  # the long ones never reached the model


def test_the_first_requests_after_start_compile_nothing(vla):
    fresh = OpenVLA(vla.config, vla.params, STATS, vla.tokenizer_dir, "float32")  # its own, empty jit caches
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # One bucket keeps this cheap (one compile): the template alone is 15 tokens with this tokenizer.
        with ActionServer(fresh, port=0, max_batch=1, max_prompt_tokens=16, progress=False) as server:
            assert server.buckets == [(1, 16)]
            after_start = len(compiles)
            assert after_start >= 1 and server.ready
            client = ActionClient(server.url)
            rng = np.random.default_rng(5)
            for text, hw in [("a", (12, 16)), ("open", (40, 56)), ("close", (7, 9))]:
                assert client.act(image(rng, *hw), text, "fractal").shape == (7,)
            assert len(compiles) == after_start, f"{len(compiles) - after_start} compile(s) on the request path"
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
