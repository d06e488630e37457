"""`make demo`: the most end-to-end path that exists so far.

Today: builds the `tiny` OpenVLA language model from configs/model.py, runs a jitted forward pass
(prefill) and a KV-cached 7-token greedy decode, and prints timings. The training issue replaces this
with: build the demo dataset, train, evaluate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_string("variant", "tiny", "model variant from configs/model.py")
flags.DEFINE_integer("batch", 4, "batch size")
flags.DEFINE_integer("prompt_len", 280, "prompt length (BOS + 256 patches + text in OpenVLA)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import model as model_configs
    from openvla_jax.models import llama

    config = model_configs.get_config(FLAGS.variant)
    module = llama.from_config(config, dtype=jnp.float32)
    b, t, steps = FLAGS.batch, FLAGS.prompt_len, 7
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32000, (b, t)), jnp.int32)

    @jax.jit
    def generate(params, tokens):
        cache = llama.init_cache(module.config, b, t + steps)
        valid = jnp.arange(t + steps)[None] < t
        valid = jnp.broadcast_to(valid, (b, t + steps))
        logits, cache = module.apply({"params": params}, tokens, attention_mask=valid, cache=cache, cache_index=0)
        nxt = logits[:, -1].argmax(-1)

        def body(i, carry):
            cache, nxt, out = carry
            out = out.at[:, i].set(nxt)
            slot = t + i
            mask = jnp.arange(t + steps)[None] <= slot
            logits, cache = module.apply(
                {"params": params}, nxt[:, None], attention_mask=jnp.broadcast_to(mask, (b, t + steps)),
                cache=cache, cache_index=slot,
            )
            return cache, logits[:, 0].argmax(-1), out

        _, last, out = jax.lax.fori_loop(0, steps - 1, body, (cache, nxt, jnp.zeros((b, steps), jnp.int32)))
        return out.at[:, -1].set(last)

    t0 = time.perf_counter()
    ids = jax.block_until_ready(generate(params, tokens))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs = 5
    for _ in range(runs):
        ids = jax.block_until_ready(generate(params, tokens))
    step_s = (time.perf_counter() - t0) / runs
    print(f"demo: {FLAGS.variant} Llama, {n_params / 1e6:.2f}M params, batch {b}, prompt {t} tokens")
    print(f"demo: first call (compile + run) {compile_s:.2f}s; prefill + 7 cached greedy steps {step_s * 1e3:.1f} ms")
    print(f"demo: greedy ids of row 0: {np.asarray(ids[0]).tolist()}")


if __name__ == "__main__":
    app.run(main)
