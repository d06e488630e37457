"""OpenVLA: fused vision backbone + projector + Llama 2, composed as Prismatic does.

The LLM input is `[emb(BOS), projected patches (P), emb(tokens[1:])]`; the attention mask gets P ones
after position 0 and labels get P x -100; positions run 0..N-1 contiguously. Logits come back in the
HF model's positions: `[B, T + P, V]`. Parameter tree: `vision_backbone/{featurizer,fused_featurizer}`,
`projector/fc{1,2,3}`, `language_model/...` — the HF checkpoint's prefixes.

Options beyond OpenVLA (OpenVLA-OFT), all off by default (then the module, its
parameters and its outputs are exactly OpenVLA's):
  num_images N      pixel_values `[B, N, S, S, 6]`: each image through the same backbone and
                    projector, the N patch blocks placed one after the other (N x P tokens)
  proprio           one projected token (`proprio_projector/...`) after the patches
  action_chunk K    K actions per prediction (K x A action tokens, or K x A continuous values)
  parallel          `parallel_actions`: the prompt is followed by K x A placeholder positions (zero
                    embeddings) decoded in one forward pass; the placeholders attend to each other
                    in both directions, everything before them stays causal. Placeholder j's
                    logits predict action token j (no shift); with `action_head` (`l1`) their
                    hidden states go through the continuous head instead.
"Inserted tokens" below are the N x P patches and the proprio token, all placed after BOS.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvla_jax.models import action_heads, llama, projector, vision
from openvla_jax.models.config import DECODINGS, HEADS, ActionOptions, VLAConfig, as_config  # noqa: F401
from openvla_jax.tokenizer.actions import ActionTokenizer

Array = jax.Array
IGNORE_INDEX = -100


class VLA(nn.Module):
    vision_backbone: vision.VisionBackbone
    projector: projector.Projector
    language_model: llama.Llama
    num_images: int = 1
    proprio_projector: Optional[action_heads.ProprioProjector] = None
    action_head: Optional[action_heads.L1ActionHead] = None
    action_dim: int = 7
    action_chunk: int = 1
    parallel: bool = False
    action_vocab_size: int = 32000  # action tokens are the last n_action_bins ids below this (Llama: 31744..31999)
    n_action_bins: int = 256

    @property
    def patches_per_image(self) -> int:
        return self.vision_backbone.featurizer_config.num_patches

    @property
    def num_patches(self) -> int:
        """Tokens inserted after BOS: N x P patches (+ 1 proprio token). OpenVLA: P."""
        return self.num_images * self.patches_per_image + (self.proprio_projector is not None)

    @property
    def action_tokenizer(self):
        """The `ActionTokenizer` of this model's vocabulary (the loss's metrics decode with it)."""
        return ActionTokenizer(vocab_size=self.action_vocab_size, n_bins=self.n_action_bins)

    @property
    def num_action_positions(self) -> int:
        return self.action_chunk * self.action_dim

    def _images(self, pixel_values: Array) -> Array:
        """-> `[B * N, S, S, 6]`, checking the camera count."""
        if self.num_images == 1 and pixel_values.ndim == 4:
            return pixel_values
        if pixel_values.ndim != 5 or pixel_values.shape[1] != self.num_images:
            raise ValueError(
                f"this model takes {self.num_images} images per row: pixel_values "
                f"[B, {self.num_images}, S, S, 6], got shape {pixel_values.shape}"
            )
        return pixel_values.reshape(-1, *pixel_values.shape[2:])

    def embed_inputs(self, pixel_values: Array, input_ids: Array, proprio: Optional[Array] = None) -> Array:
        """pixel_values NHWC `[B, H, W, 6]` (or `[B, N, H, W, 6]`), input_ids `[B, T]`, proprio `[B, Pr]`
        -> embeddings `[B, T + inserted, D]`."""
        b = input_ids.shape[0]
        patches = self.projector(self.vision_backbone(self._images(pixel_values)))
        patches = patches.reshape(b, -1, patches.shape[-1])  # the N blocks one after the other
        tokens = self.language_model.embed(input_ids)
        parts = [tokens[:, :1], patches.astype(tokens.dtype)]
        if self.proprio_projector is not None:
            if proprio is None:
                if not self.is_initializing():
                    raise ValueError(f"this model takes proprio [B, {self.proprio_projector.proprio_dim}]; none given")
                proprio = jnp.zeros((b, self.proprio_projector.proprio_dim), jnp.float32)
            parts.append(self.proprio_projector(proprio).astype(tokens.dtype))
        elif proprio is not None:
            raise ValueError("this model has no proprio input (model.proprio_dim = 0), but proprio was given")
        return jnp.concatenate(parts + [tokens[:, 1:]], axis=1)

    def __call__(
        self,
        pixel_values: Array,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        proprio: Optional[Array] = None,
        *,
        cache: Optional[llama.KVCache] = None,
        kv_mask: Optional[Array] = None,
        logits_index: Optional[Array] = None,
    ):
        """Forward pass. Without a cache: returns logits `[B, T + P, V]` (fp32), P = inserted tokens.

        With a cache (prefill): the prompt fills slots 0..T+P-1; `kv_mask` `[B, S]` marks valid slots
        (defaults to the multimodal attention mask padded with False). Returns `(logits, cache)`."""
        b = input_ids.shape[0]
        if self.action_head is not None and self.is_initializing():  # create the head's params too
            self.action_head(
                jnp.zeros(
                    (b, self.num_action_positions, self.language_model.config.hidden_size), self.language_model.dtype
                )
            )
        x = self.embed_inputs(pixel_values, input_ids, proprio)
        mask = multimodal_mask(
            attention_mask if attention_mask is not None else jnp.ones(input_ids.shape, bool), self.num_patches
        )
        if cache is None:
            out = self.language_model(embeddings=x, attention_mask=mask, logits_index=logits_index)
            logits, _ = cast(tuple[Array, Any], out)  # (logits, no cache)
            return logits
        slots = cache["k"].shape[2]
        if kv_mask is None:
            kv_mask = jnp.zeros((b, slots), bool).at[:, : mask.shape[1]].set(mask)
        return self.language_model(
            embeddings=x, attention_mask=kv_mask, cache=cache, cache_index=0, logits_index=logits_index
        )

    def parallel_actions(
        self,
        pixel_values: Array,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        proprio: Optional[Array] = None,
        action_embeddings: Optional[Array] = None,
    ) -> Array:
        """One forward pass for the whole action chunk.

        input_ids / attention_mask `[B, T]`: right-padded prompts (BOS .. "▁"); the K x A placeholder
        positions follow at fixed slots after the padding, with RoPE positions that continue each
        row's own length (pad slots are masked out), so a row's result does not depend on padding.
        `action_embeddings` `[B, K * A, D]` replaces the zero placeholders (tests).
        Returns logits `[B, K * A, V]` (fp32; placeholder j predicts action token j), or with an
        action head, normalised actions `[B, K, A]`."""
        b, t = input_ids.shape
        n_act = self.num_action_positions
        attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = self.embed_inputs(pixel_values, input_ids, proprio)
        n = x.shape[1]
        block = (
            jnp.zeros((b, n_act, x.shape[-1]), x.dtype)
            if action_embeddings is None
            else action_embeddings.astype(x.dtype)
        )
        x = jnp.concatenate([x, block], axis=1)
        valid = jnp.concatenate([multimodal_mask(attention_mask, self.num_patches), jnp.ones((b, n_act), bool)], 1)
        positions = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        index = jnp.broadcast_to(n + jnp.arange(n_act, dtype=jnp.int32), (b, n_act))
        out = self.language_model(
            embeddings=x,
            attention_mask=valid,
            positions=positions,
            bidirectional=(n, n_act),
            logits_index=index[:, :1] if self.action_head is not None else index,
            return_hidden=True,
        )
        logits, _, hidden = cast(tuple[Array, Any, Array], out)  # return_hidden: (logits, cache, hidden)
        if self.action_head is None:
            return logits
        return self.action_head(hidden[:, n:])

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


def action_options(model_config: VLAConfig) -> ActionOptions:
    """The `ActionOptions` of a model config (absent fields: OpenVLA's), checked."""
    return as_config(model_config).actions


def oft_options(model_config: VLAConfig) -> dict:
    """The options of `model_config` that differ from OpenVLA's ({} for OpenVLA itself)."""
    return action_options(model_config).differences_from_openvla()


def from_config(model_config: VLAConfig, **overrides) -> VLA:
    """The VLA of a model config (`models/config.py` VLAConfig, or a ConfigDict / dict in its layout);
    `overrides` (dtype, scan_layers, ...) go to every part."""
    config = as_config(model_config)
    opts = config.actions
    backbone = vision.from_config(config, **overrides)
    numerics = {k: v for k, v in overrides.items() if k in ("dtype", "param_dtype")}
    lm = llama.from_config(config, **overrides)
    d = lm.config.hidden_size
    proprio = head = None
    if opts.proprio_dim:
        proprio = action_heads.ProprioProjector(opts.proprio_dim, d, dtype=lm.dtype, param_dtype=lm.param_dtype)
    if opts.continuous:
        head = action_heads.L1ActionHead(opts.action_dim, d, dtype=lm.dtype, param_dtype=lm.param_dtype)
    tokens = ActionTokenizer.for_model(config)
    return VLA(
        vision_backbone=backbone,
        projector=projector.from_config(config, backbone.embed_dim, **numerics),
        language_model=lm,
        num_images=opts.num_images,
        proprio_projector=proprio,
        action_head=head,
        action_dim=opts.action_dim,
        action_chunk=opts.action_chunk,
        parallel=opts.parallel,
        action_vocab_size=tokens.vocab_size,
        n_action_bins=tokens.n_bins,
    )
