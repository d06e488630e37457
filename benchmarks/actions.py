"""Benchmark case `actions`: actions per second of the parallel chunk decoders against token-by-token
decoding, same model size, same machine, one process.

    python scripts/bench.py --case actions --config tiny,small

Decoders (random weights of the `configs/model.py` variant, 224 px images, a 20-token prompt):
  openvla             autoregressive, K = 1: 7 tokens one by one (prefill + 6 cached steps) -> 1 action
  tokens_autoreg      autoregressive, K = 8: 56 tokens one by one -> 8 actions
  parallel_tokens     K = 8: one forward pass over 56 placeholders -> 8 actions (argmax per position)
  parallel_l1         K = 8: one forward pass, continuous L1 head -> 8 actions
Every decoder is jitted and timed on the model call alone (preprocessing is the same for all), with
the calls interleaved round by round so all see the same background load.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 8
PROMPT = 20
DECODERS = {  # name -> model options
    "openvla": dict(action_chunk=1, decoding="autoregressive", action_head="tokens"),
    "tokens_autoreg": dict(action_chunk=CHUNK, decoding="autoregressive", action_head="tokens"),
    "parallel_tokens": dict(action_chunk=CHUNK, decoding="parallel", action_head="tokens"),
    "parallel_l1": dict(action_chunk=CHUNK, decoding="parallel", action_head="l1"),
}


def _decoder(variant: str, options: dict, batch: int, seed: int = 0):
    """-> (a no-argument function that runs one jitted prediction for `batch` rows, actions per call)."""
    from configs import model as model_configs
    from openvla_jax.models import decoding, vla

    cfg = model_configs.get_config(variant)
    cfg.dtype = "float32"
    for k, v in options.items():
        setattr(cfg, k, v)
    module = vla.from_config(cfg)
    size = cfg.vision.image_size
    rng = np.random.default_rng(seed)
    pv = jnp.asarray(rng.standard_normal((batch, size, size, 6)), jnp.float32)
    ids = rng.integers(3, 31000, (batch, PROMPT)).astype(np.int32)
    ids[:, 0] = 1
    ids, mask = jnp.asarray(ids), jnp.ones((batch, PROMPT), bool)
    params = jax.jit(module.init)(jax.random.key(seed), pv[:1], ids[:1])["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    k = options["action_chunk"]
    if module.parallel:
        fn = jax.jit(lambda p: decoding.parallel_decode(module, p, pv, ids, mask))
    else:
        fn = jax.jit(lambda p: decoding.greedy_decode(module, p, pv, ids, mask, num_tokens=k * cfg.action_dim))
    return (lambda: fn(params)), batch * k


def case_actions(variant: str, *, repeats: int = 5, batch: int = 8) -> list[dict]:
    """Rows per (batch size, decoder): ms per call, actions/s, and the speed-up over token-by-token
    decoding of the same chunk (`vs_tokens_autoreg`) and over OpenVLA's one action per call (`vs_openvla`)."""
    from openvla_jax.utils.timing import interleaved_medians

    rows = []
    for b in sorted({1, batch}):
        calls, per_call = {}, {}
        for name, options in DECODERS.items():
            calls[name], per_call[name] = _decoder(variant, options, b)
        seconds = interleaved_medians(calls, warmup=1, repeats=repeats, block=jax.block_until_ready)
        rate = {name: per_call[name] / s for name, s in seconds.items()}
        for name in DECODERS:
            rows.append(
                dict(
                    decoder=name,
                    batch=b,
                    chunk=DECODERS[name]["action_chunk"],
                    ms_per_call=seconds[name] * 1e3,
                    actions_per_s=rate[name],
                    vs_tokens_autoreg=rate[name] / rate["tokens_autoreg"],
                    vs_openvla=rate[name] / rate["openvla"],
                )
            )
    return rows


if __name__ == "__main__":
    import json
    import sys

    for v in sys.argv[1:] or ["tiny"]:
        for row in case_actions(v, repeats=3):
            print(json.dumps(dict(config=v, **row)))
