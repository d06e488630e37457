"""Llama 2 decoder in Flax linen, laid out so HF `LlamaForCausalLM` weights map without permutation.

Pure functions of `(params, inputs)`: the KV cache is an explicit input and output, not a mutable
collection. Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`,
`layers`) for `openvla_jax.parallel` to place. Shapes: B batch, T new tokens, S cache slots,
D hidden, H heads, K key/value heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from openvla_jax.models.common import attention, numerics, partitioned, remat_policy
from openvla_jax.models.config import LlamaConfig, VLAConfig, as_config

Array = jax.Array
KVCache = dict  # {"k": [L, B, S, K, Dh], "v": [L, B, S, K, Dh]}


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty KV cache of `length` slots: {"k", "v"} each [L, B, S, K, Dh]."""
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _init(config: LlamaConfig, names: tuple[str, ...]):
    return partitioned(nn.initializers.normal(config.initializer_range), names)


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = jnp.asarray(
            self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """HF rotate-half RoPE. x: [B, T, H, Dh]; positions: [B, T] int."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv, cache_index):
        c = self.config
        h, k, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dense = lambda feats, names, name: nn.DenseGeneral(  # noqa: E731
            feats,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(c, names),
            name=name,
        )
        q = dense((h, dh), ("embed", "heads", "kv"), "q_proj")(x)
        kk = dense((k, dh), ("embed", "heads", "kv"), "k_proj")(x)
        v = dense((k, dh), ("embed", "heads", "kv"), "v_proj")(x)
        q = rotary(q, positions, c.rope_theta)
        kk = rotary(kk, positions, c.rope_theta)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            kk = jax.lax.dynamic_update_slice_in_dim(ck, kk.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            new_kv = (kk, v)
            kk, v = kk.astype(self.dtype), v.astype(self.dtype)
        out = attention(q, kk, v, mask, impl=self.attention_impl)
        out = nn.DenseGeneral(
            c.hidden_size,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(c, ("heads", "kv", "embed")),
            name="o_proj",
        )(out)
        return out, new_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda feats, names, name: nn.Dense(  # noqa: E731
            feats,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(c, names),
            name=name,
        )
        gate = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(c.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, positions, mask, cache_kv, cache_index):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        h, new_kv = Attention(c, self.dtype, self.param_dtype, self.attention_impl, name="self_attn")(
            norm("input_layernorm")(x), positions, mask, cache_kv, cache_index
        )
        x = x + h
        x = x + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("post_attention_layernorm")(x))
        x = with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_kv


def attention_mask_4d(
    keys_valid: Array, t: int, cache_index: Any = 0, bidirectional: Optional[tuple[int, int]] = None
) -> Array:
    """Who attends to whom: bool `[B, 1, T, S]` (True = attend) for T queries at slots
    `cache_index..cache_index+T-1` over S key slots, `keys_valid` `[B, S]`. Causal (slot j <= i),
    except that the slots of the `bidirectional` (start, length) block also see the block's later
    slots; nobody outside the block sees into it early."""
    s = keys_valid.shape[1]
    q_slot = cache_index + jnp.arange(t)
    k_slot = jnp.arange(s)
    allowed = q_slot[:, None] >= k_slot[None, :]  # [T, S]
    if bidirectional is not None:
        start, length = bidirectional
        in_q = (q_slot >= start) & (q_slot < start + length)
        in_k = (k_slot >= start) & (k_slot < start + length)
        allowed = allowed | (in_q[:, None] & in_k[None, :])
    return allowed[None, None] & keys_valid[:, None, None, :]


class Llama(nn.Module):
    """LlamaForCausalLM. `__call__` runs tokens or embeddings through the decoder to logits.

    Without a cache: `mask` defaults to causal AND the key padding mask `attention_mask` [B, T].
    With a cache: the T new tokens are written at slots `cache_index..cache_index+T-1`, and
    `attention_mask` [B, S] marks the cache slots that hold real tokens (including the new ones);
    a query at slot i sees the valid slots j <= i. `positions` [B, T] are the RoPE positions
    (default: `cache_index + arange(T)`), so right-padded rows of a batch keep their own positions.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=_init(c, ("vocab", "embed")),
        )
        layer_cls = DecoderLayer
        policy = remat_policy(self.remat_policy)
        if self.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not self.scan_layers)
        kwargs: dict[str, Any] = dict(
            config=c, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl
        )
        if self.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),  # pyright: ignore[reportArgumentType]
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = scanned(**kwargs)
        else:
            self.layers = [layer_cls(**kwargs, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        self.lm_head = nn.Dense(
            c.vocab_size,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_init(c, ("embed", "vocab")),
        )

    def embed(self, tokens: Array) -> Array:
        """[B, T] int -> [B, T, D] in the compute dtype."""
        return self.embed_tokens(tokens)

    def __call__(
        self,
        tokens: Optional[Array] = None,
        *,
        embeddings: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        positions: Optional[Array] = None,
        cache: Optional[KVCache] = None,
        cache_index: Any = 0,
        logits_index: Optional[Array] = None,
        return_hidden: bool = False,
        bidirectional: Optional[tuple[int, int]] = None,
    ):
        """Returns `(logits [B, T, V] fp32, new_cache or None)`; with `return_hidden`, also the final
        normed hidden states [B, T, D]: `(logits, new_cache, hidden)`.

        `logits_index` [B] int: compute logits only at that position of each row -> [B, 1, V]
        (a prefill needs just the last prompt position; skips most of the lm_head work); [B, K] int:
        at K positions per row -> [B, K, V] (training: only the supervised positions).

        `bidirectional` (start, length), static: the slots start..start+length-1 also attend to each
        other's *later* slots (a block decoded in parallel); every other query stays causal, so
        nothing before the block can see into it."""
        if tokens is not None and embeddings is None:
            x = self.embed(tokens)
        elif tokens is None and embeddings is not None:
            x = embeddings.astype(self.dtype)
        else:
            raise ValueError("pass exactly one of `tokens` [B, T] or `embeddings` [B, T, D]")
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        s = t if cache is None else cache["k"].shape[2]
        keys_valid = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        if keys_valid.shape != (b, s):
            raise ValueError(f"attention_mask must be [B, S] = {(b, s)}, got {keys_valid.shape}")
        mask = attention_mask_4d(keys_valid, t, cache_index, bidirectional)
        x = with_logical_constraint(x, ("batch", "length", "embed"))

        new_cache = None
        if self.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            x, new_kv = cast(DecoderLayer, self.layers)(x, positions, mask, kv, cache_index)
            if new_kv is not None:  # exactly when a cache was passed
                new_cache = {"k": new_kv[0], "v": new_kv[1]}
        else:
            ks, vs = [], []
            for i, layer in enumerate(cast(Sequence[DecoderLayer], self.layers)):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                x, new_kv = layer(x, positions, mask, kv, cache_index)
                if new_kv is not None:
                    ks.append(new_kv[0])
                    vs.append(new_kv[1])
            if cache is not None:
                new_cache = {"k": jnp.stack(ks), "v": jnp.stack(vs)}
        hidden = self.norm(x)
        if logits_index is None:
            picked = hidden
        else:
            idx = logits_index[:, None] if logits_index.ndim == 1 else logits_index
            picked = jnp.take_along_axis(hidden, idx[..., None], axis=1)
        logits = self.lm_head(picked).astype(jnp.float32)
        logits = with_logical_constraint(logits, ("batch", "length", "vocab"))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache


def from_config(model_config: VLAConfig, **overrides) -> Llama:
    """Build the Llama module from a model config (its `llm` section and numerics)."""
    config = as_config(model_config)
    kwargs: dict[str, Any] = dict(config=config.llm)
    kwargs.update(numerics(config, **overrides))
    return Llama(**kwargs)
