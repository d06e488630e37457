"""The decoders of a VLA, jitted by their callers (pure functions of params and inputs).

`greedy_decode`: OpenVLA's token-by-token decoding (one prefill, then cached steps).
`parallel_decode`: the OFT parallel decoder (the whole action chunk in one forward pass).
A position whose logits are not all finite (NaN weights, an overflow) decodes to `NON_FINITE` (-1),
never to a token: argmax over NaN would pick an arbitrary id that decodes to a full-scale action.
"""

from __future__ import annotations

from typing import Optional, cast

import jax
import jax.numpy as jnp

from openvla_jax.models import llama
from openvla_jax.models.vla import VLA, multimodal_mask

Array = jax.Array
NON_FINITE = -1  # the id of a position whose logits were not all finite


def _pick(logits: Array) -> Array:
    """Greedy ids `[...]` of logits `[..., V]`; NON_FINITE where any logit is NaN or inf."""
    ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.isfinite(logits).all(axis=-1), ids, NON_FINITE)


def greedy_decode(
    module: VLA,
    params,
    pixel_values: Array,
    input_ids: Array,
    attention_mask: Array,
    num_tokens: int = 7,
    proprio: Optional[Array] = None,
) -> Array:
    """Greedy ids `[B, num_tokens]` for right-padded prompts: one prefill, then `num_tokens - 1`
    cached steps in a `lax.fori_loop`. Each row continues at its own length (slots of padding are
    masked out and RoPE positions count only real tokens), so a row's result does not depend on
    the other rows of the batch. Jit this (it is pure); shapes fix the compiled program."""
    b, t = input_ids.shape
    n = t + module.num_patches
    slots = n + num_tokens - 1
    lm = module.language_model
    cache = llama.init_cache(lm.config, b, slots, lm.dtype)
    prompt_mask = multimodal_mask(attention_mask, module.num_patches)
    kv_mask = jnp.zeros((b, slots), bool).at[:, :n].set(prompt_mask)
    lengths = prompt_mask.sum(axis=1).astype(jnp.int32)  # real tokens per row (right padding)
    logits, cache = module.apply(
        {"params": params},
        pixel_values,
        input_ids,
        attention_mask,
        proprio,
        cache=cache,
        kv_mask=kv_mask,
        logits_index=lengths - 1,
    )
    first = _pick(logits[:, 0])
    out = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        cache, kv_mask, out = carry
        slot = n + i
        kv_mask = kv_mask.at[:, slot].set(True)
        logits, cache = module.apply(
            {"params": params},
            jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1),
            (lengths + i)[:, None],
            kv_mask,
            cache,
            slot,
            method=VLA.decode_step,
        )
        nxt = _pick(logits[:, 0])
        return cache, kv_mask, out.at[:, i + 1].set(nxt)

    _, _, out = jax.lax.fori_loop(0, num_tokens - 1, body, (cache, kv_mask, out))
    return out


def parallel_decode(
    module: VLA, params, pixel_values: Array, input_ids: Array, attention_mask: Array, proprio: Optional[Array] = None
) -> Array:
    """The parallel decoder's prediction in one forward pass: greedy action ids `[B, K * A]` (token
    head) or normalised actions `[B, K, A]` (continuous head). Jit this."""
    out = cast(
        Array,
        module.apply({"params": params}, pixel_values, input_ids, attention_mask, proprio, method=VLA.parallel_actions),
    )
    if module.action_head is not None:
        return out
    return _pick(out)
