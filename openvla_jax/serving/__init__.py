"""Serving a policy over HTTP.

- `server.ActionServer`: `POST /act` compatible with OpenVLA's deploy server, dynamic batching.
- `client.ActionClient`: its client; `wire`: the `/act` request and reply format; `jsonnp`: the
  json-numpy encoding (throughput and latency on loopback: `benchmarks/serve.py`).

Nothing is imported here, so `import openvla_jax.serving.client` stays light (no JAX).
"""
