"""Evaluation and serving.

- `server.ActionServer`: HTTP `POST /act` compatible with OpenVLA's deploy server, dynamic batching.
- `client.ActionClient`: its client; `jsonnp`: the json-numpy wire format (throughput and latency
  of the server on loopback: `benchmarks/serve.py`).

Nothing is imported here, so `import openvla_jax.evaluate.client` stays light (no JAX).
"""
