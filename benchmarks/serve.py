"""Server throughput and latency: closed-loop clients against `ActionServer` on loopback.

    python -m benchmarks.serve            # tiny random model, prints a table
    python -m benchmarks.serve --startup --variant small --max_batch 8 --max_prompt_tokens 64

`bench_server(vla)` starts the server in-process once per (batching, clients) setting; each of
`clients` threads sends `requests_per_client` requests back to back (a robot waits for its action
before sending the next frame), so throughput = all requests / wall time and latency is per request,
client side (JSON encoding, HTTP, queueing, batching wait and the model call). The server compiles
every bucket before it is ready, so nothing compiles while timing. Called by `scripts/bench.py
--case serve`. `bench_startup(vla)`: how long a server takes from start to ready (compiling).
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Sequence

import numpy as np

from openvla_jax.serving.client import ActionClient
from openvla_jax.serving.server import ActionServer

INSTRUCTIONS = ("pick up the red block", "open the drawer", "put the cup on the plate", "push the button")


def bench_server(
    vla,
    clients: Sequence[int] = (1, 8, 32),
    batching: Sequence[bool] = (True, False),
    requests_per_client: int = 8,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    image_hw=(224, 224),
    encoding: str = "json_numpy",
    unnorm_key=None,
    max_prompt_tokens: int = 32,
) -> list[dict]:
    """-> one row per (batching, clients): throughput_rps, p50_ms, p99_ms, mean_ms, model_calls,
    mean_batch (requests per model call). Batching off means `max_batch=1`. `max_prompt_tokens`
    bounds what the server compiles (INSTRUCTIONS' prompts fit 32 tokens)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8) for _ in range(max(clients))]
    rows = []
    for on in batching:
        server = ActionServer(
            vla,
            port=0,
            max_batch=max_batch if on else 1,
            max_wait_ms=max_wait_ms,
            max_prompt_tokens=max_prompt_tokens,
            progress=False,
        )
        with server:
            client = ActionClient(server.url)
            client.act(images[0], INSTRUCTIONS[0], unnorm_key, encoding)  # the HTTP path, once
            for n in clients:
                before = server.stats().get("model_calls", 0)
                latencies = [[] for _ in range(n)]
                errors = []
                start = threading.Barrier(n + 1)

                def run(i):
                    start.wait()
                    try:
                        for r in range(requests_per_client):
                            t = time.perf_counter()
                            client.act(images[i], INSTRUCTIONS[(i + r) % len(INSTRUCTIONS)], unnorm_key, encoding)
                            latencies[i].append(time.perf_counter() - t)
                    except Exception as e:  # noqa: BLE001 -- reported below, not swallowed
                        errors.append(e)

                threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                start.wait()
                t0 = time.perf_counter()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                if errors:
                    raise RuntimeError(f"{len(errors)} client(s) failed, first: {errors[0]!r}")
                lat_ms = 1e3 * np.concatenate(latencies)
                calls = server.stats()["model_calls"] - before
                rows.append(
                    {
                        "batching": bool(on),
                        "clients": n,
                        "requests": int(lat_ms.size),
                        "throughput_rps": lat_ms.size / wall,
                        "p50_ms": float(np.percentile(lat_ms, 50)),
                        "p99_ms": float(np.percentile(lat_ms, 99)),
                        "mean_ms": float(lat_ms.mean()),
                        "model_calls": int(calls),
                        "mean_batch": lat_ms.size / max(calls, 1),
                        "max_batch": server.max_batch,
                        "max_wait_ms": server.max_wait_ms,
                    }
                )
    return rows


def bench_startup(vla, max_batch: int = 8, max_prompt_tokens: int = 64) -> dict:
    """Seconds from `start()` to ready (every bucket compiled) for a fresh model's server."""
    server = ActionServer(vla, port=0, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens)
    t0 = time.perf_counter()
    with server:
        ready_s = time.perf_counter() - t0
    return {
        "buckets": len(server.buckets),
        "max_batch": max_batch,
        "max_prompt_tokens": max_prompt_tokens,
        "ready_s": ready_s,
        "per_bucket_s": ready_s / max(len(server.buckets), 1),
    }


def format_table(rows: list[dict]) -> str:
    lines = [f"{'batching':>8} {'clients':>7} {'req':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"]
    for r in rows:
        lines.append(
            f"{'on' if r['batching'] else 'off':>8} {r['clients']:>7} {r['requests']:>5} "
            f"{r['throughput_rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>6.1f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- tiny random model
def tiny_random_vla(variant: str = "tiny", dtype: str = "float32", seed: int = 0):
    """An `OpenVLA` with random weights of `configs/model.py:<variant>`, a throwaway tokenizer and
    one dataset's statistics: for timing only, its actions mean nothing."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from configs import model as model_configs
    from openvla_jax.models import vla as vla_lib
    from openvla_jax.policy import OpenVLA

    config = model_configs.get_config(variant)
    module = vla_lib.from_config(config, dtype=jnp.float32, param_dtype=jnp.float32)
    params = jax.jit(lambda k: nn.unbox(module.init(k, jnp.zeros((1, 224, 224, 6)), jnp.ones((1, 8), jnp.int32))))(
        jax.random.key(seed)
    )["params"]
    stats = {"bench": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    from openvla_jax.tokenizer.small_spm import write_sentencepiece

    tok_dir = write_sentencepiece(tempfile.mkdtemp(prefix="serve_bench_tok_"), INSTRUCTIONS)
    return OpenVLA(config, params, stats, tok_dir, dtype)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests_per_client", type=int, default=8)
    p.add_argument("--max_batch", type=int, default=32)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--batching", default="on,off", help="on, off or on,off")
    p.add_argument("--startup", action="store_true", help="time start-up compiling instead")
    p.add_argument("--max_prompt_tokens", type=int, default=64, help="--startup: the prompt cap compiled up to")
    args = p.parse_args()
    vla = tiny_random_vla(args.variant)
    if args.startup:
        print(bench_startup(vla, args.max_batch, args.max_prompt_tokens))
        return
    rows = bench_server(
        vla,
        clients=tuple(int(c) for c in args.clients.split(",")),
        requests_per_client=args.requests_per_client,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        batching=tuple(b == "on" for b in args.batching.split(",")),
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
