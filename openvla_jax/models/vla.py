"""OpenVLA: fused vision backbone + projector + Llama 2, composed as Prismatic does.

The LLM input is `[emb(BOS), projected patches (P), emb(tokens[1:])]`; the attention mask gets P ones
after position 0 and labels get P x -100; positions run 0..N-1 contiguously. Logits come back in the
HF model's positions: `[B, T + P, V]`. Parameter tree: `vision_backbone/{featurizer,fused_featurizer}`,
`projector/fc{1,2,3}`, `language_model/...` — the HF checkpoint's prefixes.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from openvla_jax.models import llama, projector, vision

Array = jax.Array
IGNORE_INDEX = -100


class VLA(nn.Module):
    vision_backbone: vision.VisionBackbone
    projector: projector.Projector
    language_model: llama.Llama

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.featurizer_config.num_patches

    def embed_inputs(self, pixel_values: Array, input_ids: Array) -> Array:
        """pixel_values NHWC `[B, H, W, 6]`, input_ids `[B, T]` -> embeddings `[B, T + P, D]`."""
        patches = self.projector(self.vision_backbone(pixel_values))
        tokens = self.language_model.embed(input_ids)
        return jnp.concatenate([tokens[:, :1], patches.astype(tokens.dtype), tokens[:, 1:]], axis=1)

    def __call__(
        self,
        pixel_values: Array,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        *,
        cache: Optional[llama.KVCache] = None,
        kv_mask: Optional[Array] = None,
        logits_index: Optional[Array] = None,
    ):
        """Forward pass. Without a cache: returns logits `[B, T + P, V]` (fp32).

        With a cache (prefill): the prompt fills slots 0..T+P-1; `kv_mask` `[B, S]` marks valid slots
        (defaults to the multimodal attention mask padded with False). Returns `(logits, cache)`."""
        b = input_ids.shape[0]
        x = self.embed_inputs(pixel_values, input_ids)
        mask = multimodal_mask(attention_mask if attention_mask is not None else jnp.ones(input_ids.shape, bool),
                               self.num_patches)
        if cache is None:
            logits, _ = self.language_model(embeddings=x, attention_mask=mask, logits_index=logits_index)
            return logits
        slots = cache["k"].shape[2]
        if kv_mask is None:
            kv_mask = jnp.zeros((b, slots), bool).at[:, : mask.shape[1]].set(mask)
        return self.language_model(
            embeddings=x, attention_mask=kv_mask, cache=cache, cache_index=0, logits_index=logits_index
        )

    def decode_step(self, tokens: Array, positions: Array, kv_mask: Array, cache: llama.KVCache, slot):
        """One cached step: tokens `[B, 1]` written at cache `slot`, RoPE `positions` `[B, 1]`."""
        return self.language_model(tokens, positions=positions, attention_mask=kv_mask, cache=cache, cache_index=slot)


def multimodal_mask(attention_mask: Array, num_patches: int) -> Array:
    """`[B, T]` -> `[B, T + P]`: P ones after the BOS position."""
    m = attention_mask.astype(bool)
    ones = jnp.ones((m.shape[0], num_patches), bool)
    return jnp.concatenate([m[:, :1], ones, m[:, 1:]], axis=1)


def multimodal_labels(labels: Array, num_patches: int) -> Array:
    """`[B, T]` -> `[B, T + P]`: P x IGNORE_INDEX after the BOS position."""
    pad = jnp.full((labels.shape[0], num_patches), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, :1], pad, labels[:, 1:]], axis=1)


def greedy_decode(module: VLA, params, pixel_values: Array, input_ids: Array, attention_mask: Array,
                  num_tokens: int = 7) -> Array:
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
        {"params": params}, pixel_values, input_ids, attention_mask, cache=cache, kv_mask=kv_mask,
        logits_index=lengths - 1,
    )
    first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        cache, kv_mask, out = carry
        slot = n + i
        kv_mask = kv_mask.at[:, slot].set(True)
        logits, cache = module.apply(
            {"params": params}, jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1),
            (lengths + i)[:, None], kv_mask, cache, slot, method=VLA.decode_step,
        )
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return cache, kv_mask, out.at[:, i + 1].set(nxt)

    _, _, out = jax.lax.fori_loop(0, num_tokens - 1, body, (cache, kv_mask, out))
    return out


def from_config(model_config: ml_collections.ConfigDict, **overrides) -> VLA:
    """The VLA of a `configs/model.py` config; `overrides` (dtype, scan_layers, ...) go to every part."""
    backbone = vision.from_config(model_config, **overrides)
    return VLA(
        vision_backbone=backbone,
        projector=projector.from_config(model_config, backbone.embed_dim,
                                        **{k: v for k, v in overrides.items() if k in ("dtype", "param_dtype")}),
        language_model=llama.from_config(model_config, **overrides),
    )
