"""Config-driven ViT in Flax linen covering timm's DINOv2 (cls + registers, LayerScale) and SigLIP
(no prefix tokens, attention-pool head) towers, laid out so timm state dicts map by reshape only.

Shapes: B batch, H/W image pixels, P prefix tokens (cls + registers), N patches, D width, Hd heads,
Dh head dim, F MLP width. Images are NHWC `[B, H, W, 3]`.

Logical axis names used on parameters (mapped to mesh axes only by `openvla_jax.parallel`):
  `embed` (width D), `mlp` (MLP hidden F), `heads` (attention heads), `kv` (head dim),
  `layers` (stacked blocks when scanned), `pos` (position-embedding tokens); `None` marks small axes
  that are never sharded (conv taps, the q/k/v selector, singleton token axes).

Every block output is available: `__call__(..., num_blocks=n)` runs blocks 0..n-1 only (the
featurizer uses n = depth - 1 for "the second-to-last block" and never computes the last), and
`return_blocks=True` stacks each block's output. `init` always creates every parameter (last block,
final norm, attention pool) so a checkpoint round trip is complete.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.spmd import with_logical_constraint

from openvla_jax.models.common import attention, numerics, partitioned, remat_policy
from openvla_jax.models.config import TowerConfig, VLAConfig, as_config, as_tower
from openvla_jax.models.preprocess import resize_weights

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    layer_scale: bool = False  # timm's init_values is not None
    no_embed_class: bool = False  # timm: True = pos_embed covers patches only (added before prefix tokens)
    attn_pool: bool = False  # timm global_pool="map"
    img_size: int = 224
    norm_eps: float = 1e-6

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # as timm's Block: int(dim * mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def num_pos_prefix(self) -> int:
        """Prefix tokens that have their own position embedding (0 with `no_embed_class`)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens


# timm architecture name (model id without its pretrained tag) -> ViTConfig fields.
_DINOV2_L = dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14, layer_scale=True)
_SO400M = dict(
    embed_dim=1152, depth=27, num_heads=16, patch_size=14, mlp_ratio=3.7362, class_token=False, attn_pool=True
)
ARCHITECTURES = {
    "vit_large_patch14_reg4_dinov2": dict(_DINOV2_L, reg_tokens=4, no_embed_class=True),
    "vit_large_patch14_dinov2": _DINOV2_L,
    "vit_so400m_patch14_siglip_224": _SO400M,
    "vit_so400m_patch14_siglip_384": _SO400M,
    "vit_base_patch16_siglip_224": dict(
        embed_dim=768, depth=12, num_heads=12, patch_size=16, class_token=False, attn_pool=True
    ),
}


def vit_config(
    model_id: str,
    img_size: int = 224,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
) -> ViTConfig:
    """The architecture of timm model `model_id` (pretrained tag such as `.lvd142m` ignored) at
    `img_size`, with timm-style overrides (None keeps timm's value; mlp width follows embed_dim)."""
    arch = model_id.split(".")[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown ViT model id {model_id!r}; expected one of {sorted(ARCHITECTURES)}")
    fields: dict[str, Any] = dict(ARCHITECTURES[arch], img_size=img_size)
    for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value is not None:
            fields[name] = value
    if fields["embed_dim"] % fields["num_heads"]:
        raise ValueError(f"{model_id}: embed_dim {fields['embed_dim']} not divisible by {fields['num_heads']} heads")
    return ViTConfig(**fields)


def tower_from_config(tower: TowerConfig, img_size: int = 224) -> ViTConfig:
    """A tower config (`models/config.py` TowerConfig, or its dict / ConfigDict) -> ViTConfig."""
    t = as_tower(tower)
    return vit_config(t.model_id, img_size, t.embed_dim, t.depth, t.num_heads)


def resample_pos_embed(
    pos_embed: Array, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 0
) -> Array:
    """`[1, num_prefix + gh*gw, D]` position embeddings with the patch part resampled to `new_grid`
    (prefix entries kept), as timm's `resample_abs_pos_embed` (torch bicubic, antialias=True,
    align_corners=False), computed in fp32."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    if num_prefix:
        patches = resample_pos_embed(pos_embed[:, num_prefix:], old_grid, new_grid)
        return jnp.concatenate([pos_embed[:, :num_prefix], patches], axis=1)
    wy = jnp.asarray(resize_weights(old_grid[0], new_grid[0]), jnp.float32)  # [nh, oh]
    wx = jnp.asarray(resize_weights(old_grid[1], new_grid[1]), jnp.float32)  # [nw, ow]
    d = pos_embed.shape[-1]
    grid = pos_embed.astype(jnp.float32).reshape(old_grid[0], old_grid[1], d)
    out = jnp.einsum("yh,xw,hwd->yxd", wy, wx, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(1, new_grid[0] * new_grid[1], d).astype(pos_embed.dtype)


def _dense_init(names):
    return partitioned(nn.initializers.truncated_normal(0.02), names)


def _zeros(names):
    return partitioned(nn.initializers.zeros_init(), names)


def _layer_norm(cfg: ViTConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)),
    )


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm's Mlp with nn.GELU."""

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc1",
            kernel_init=_dense_init(("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
        )(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(
            d,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc2",
            kernel_init=_dense_init(("mlp", "embed")),
            bias_init=_zeros(("embed",)),
        )(x)


class SelfAttention(nn.Module):
    """timm Attention: fused qkv `[D, 3, Hd, Dh]` with bias, softmax(q k^T / sqrt(Dh)) v, proj."""

    cfg: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        qkv = nn.DenseGeneral(
            (3, c.num_heads, c.head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
            kernel_init=_dense_init(("embed", None, "heads", "kv")),
            bias_init=_zeros((None, "heads", "kv")),
        )(x)  # [B, T, 3, Hd, Dh]
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, impl=self.attention_impl)
        return nn.DenseGeneral(
            c.embed_dim,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
            kernel_init=_dense_init(("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)),
        )(out)


class LayerScale(nn.Module):
    """x * scale_factor (timm's `gamma`; the HF checkpoint calls it `scale_factor`)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = partitioned(nn.initializers.constant(1e-5), ("embed",))
        scale = jnp.asarray(self.param("scale_factor", init, (x.shape[-1],), self.param_dtype))
        return x * scale.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))). `[B, T, D] -> [B, T, D]`.

    With `scan_mode` the signature is the nn.scan body `(x, _) -> (x, x or None)`.
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    scan_mode: bool = False
    emit: bool = False  # scan_mode only: also return the block output as the scan's per-step output

    @nn.compact
    def __call__(self, x: Array, _=None):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        h = SelfAttention(c, dt, pdt, self.attention_impl, name="attn")(_layer_norm(c, dt, pdt, "norm1")(x))
        if c.layer_scale:
            h = LayerScale(pdt, name="ls1")(h)
        x = x + h
        h = Mlp(c.mlp_dim, dt, pdt, name="mlp")(_layer_norm(c, dt, pdt, "norm2")(x))
        if c.layer_scale:
            h = LayerScale(pdt, name="ls2")(h)
        x = x + h
        x = with_logical_constraint(x, ("batch", "length", "embed"))
        if self.scan_mode:
            return x, (x if self.emit else None)
        return x


class AttentionPool(nn.Module):
    """timm AttentionPoolLatent (SigLIP's "map" head): one latent query attends over the tokens,
    then proj and a residual MLP. `[B, T, D] -> [B, D]`. OpenVLA keeps but never uses it."""

    cfg: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        latent = jnp.asarray(
            self.param(
                "latent",
                partitioned(nn.initializers.normal(c.embed_dim**-0.5), (None, None, "embed")),
                (1, 1, c.embed_dim),
                pdt,
            )
        )
        dense = lambda feats, names, bias_names, name, **kw: nn.DenseGeneral(  # noqa: E731
            feats,
            dtype=dt,
            param_dtype=pdt,
            name=name,
            kernel_init=_dense_init(names),
            bias_init=_zeros(bias_names),
            **kw,
        )
        q = dense((c.num_heads, c.head_dim), ("embed", "heads", "kv"), ("heads", "kv"), "q")(latent.astype(dt))
        kv = dense((2, c.num_heads, c.head_dim), ("embed", None, "heads", "kv"), (None, "heads", "kv"), "kv")(x)
        q = jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:])
        out = attention(q, kv[:, :, 0], kv[:, :, 1], None)  # [B, 1, Hd, Dh]
        out = dense(c.embed_dim, ("heads", "kv", "embed"), ("embed",), "proj", axis=(-2, -1))(out)
        out = out + Mlp(c.mlp_dim, dt, pdt, name="mlp")(_layer_norm(c, dt, pdt, "norm")(out))
        return out[:, 0]


class ViT(nn.Module):
    """timm VisionTransformer: patch embed, position embeddings, [cls, registers] prepended (after the
    position embedding with `no_embed_class`, as DINOv2-reg4; before it otherwise), pre-norm blocks.

    `__call__(images [B, H, W, 3], num_blocks=None, return_blocks=False)` returns a dict:
      "tokens" `[B, P + N, D]` output of block `num_blocks - 1` (no final norm);
      "blocks" `[n, B, P + N, D]` every block output 0..n-1 (only with `return_blocks`);
      when all blocks ran: "encoded" = final norm of tokens, and with an attention pool "pooled" `[B, D]`.
    Images whose patch grid differs from `cfg.grid` get bicubic-resampled position embeddings.
    """

    cfg: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def _blocks(self, x: Array, n: int, return_blocks: bool):
        c = self.cfg
        block_cls = Block
        if self.remat_policy != "none":
            block_cls = nn.remat(block_cls, policy=remat_policy(self.remat_policy), prevent_cse=not self.scan_layers)
        kwargs: dict[str, Any] = dict(
            cfg=c, dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl
        )
        if not self.scan_layers:
            outs = []
            for i in range(n):
                x = cast(Array, block_cls(**kwargs, name=f"blocks_{i}")(x))  # not scan_mode: just x
                outs.append(x)
            return x, (jnp.stack(outs) if return_blocks else None)
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=n,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if n < c.depth:
            # Run only the first n of the stacked layers: slice the [depth, ...] params to [n, ...].
            scanned = nn.map_variables(
                scanned, "params", trans_in_fn=lambda tree: jax.tree.map(lambda a: a[:n], tree), mutable=False
            )
        return scanned(**kwargs, scan_mode=True, emit=return_blocks, name="blocks")(x, None)

    @nn.compact
    def __call__(self, images: Array, *, num_blocks: Optional[int] = None, return_blocks: bool = False) -> dict:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ViT expects NHWC images [B, H, W, 3], got shape {images.shape}")
        n = c.depth if num_blocks is None else num_blocks
        if not 1 <= n <= c.depth:
            raise ValueError(f"num_blocks must be in 1..{c.depth}, got {num_blocks}")
        if self.is_initializing():
            n = c.depth  # create every parameter, including the blocks a featurizer skips

        x = nn.Conv(
            c.embed_dim,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            dtype=dt,
            param_dtype=pdt,
            name="patch_embed",
            kernel_init=_dense_init((None, None, None, "embed")),
            bias_init=_zeros(("embed",)),
        )(images.astype(dt))
        b, gh, gw, d = x.shape
        pos = jnp.asarray(
            self.param(
                "pos_embed",
                partitioned(nn.initializers.normal(0.02), (None, "pos", "embed")),
                (1, c.num_pos_prefix + c.num_patches, d),
                pdt,
            )
        )
        pos = resample_pos_embed(pos, c.grid, (gh, gw), c.num_pos_prefix).astype(dt)
        x = x.reshape(b, gh * gw, d)
        if c.no_embed_class:  # DINOv2-reg / big_vision: add to patches, then prepend prefix tokens
            x = x + pos
        prefix = []
        if c.class_token:
            init = partitioned(nn.initializers.normal(1e-6), (None, None, "embed"))
            cls = jnp.asarray(self.param("cls_token", init, (1, 1, d), pdt))
            prefix.append(jnp.broadcast_to(cls.astype(dt), (b, 1, d)))
        if c.reg_tokens:
            init = partitioned(nn.initializers.normal(1e-6), (None, None, "embed"))
            reg = jnp.asarray(self.param("reg_token", init, (1, c.reg_tokens, d), pdt))
            prefix.append(jnp.broadcast_to(reg.astype(dt), (b, c.reg_tokens, d)))
        x = jnp.concatenate(prefix + [x], axis=1) if prefix else x
        if not c.no_embed_class:  # original ViT: prefix tokens have positions too, add after concat
            x = x + pos
        x = with_logical_constraint(x, ("batch", "length", "embed"))

        x, blocks = self._blocks(x, n, return_blocks)
        out = {"tokens": x}
        if return_blocks:
            out["blocks"] = blocks
        if n == c.depth:
            out["encoded"] = _layer_norm(c, dt, pdt, "norm")(x)
            if c.attn_pool:
                out["pooled"] = AttentionPool(c, dt, pdt, name="attn_pool")(out["encoded"])
        return out

    def features(self, images: Array, block: int = -2) -> Array:
        """Patch tokens `[B, N, D]` of block `block` (negative counts from the end), without the final
        norm and without prefix tokens: what OpenVLA's featurizers return (block -2)."""
        n = (block % self.cfg.depth) + 1
        return self(images, num_blocks=n)["tokens"][:, self.cfg.num_prefix_tokens :]


def from_config(tower: TowerConfig, model_config: Optional[VLAConfig] = None, **overrides) -> ViT:
    """A ViT from a tower config at the model's image size, with its numerics; without a model
    config, a standalone tower: 224 px, fp32 compute."""
    config = as_config(model_config) if model_config is not None else VLAConfig(dtype="float32")
    kwargs: dict[str, Any] = dict(cfg=tower_from_config(tower, config.vision.image_size))
    kwargs.update(numerics(config, **overrides))
    return ViT(**kwargs)


def count_params(params) -> int:
    """Total number of scalars in a (possibly boxed / ShapeDtypeStruct) params tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))
