"""OpenVLA's fused vision backbone: DINOv2 and SigLIP run on the same image, features concatenated.

Input NHWC `pixel_values [B, H, W, 6]` (channels 0-2 normalised for DINOv2, 3-5 for SigLIP; see
`openvla_jax.models.preprocess`); HF's NCHW `[B, 6, H, W]` goes through `to_nhwc` first. Each tower
returns the output of its second-to-last block, without the final norm and without prefix tokens
(Prismatic's `get_intermediate_layers(n={depth - 2})`); the last block is never computed.
Output `[B, N, D_dino + D_siglip]` (7B: `[B, 256, 1024 + 1152]`). With no fused tower the module is
a single backbone on `[B, H, W, 3]`. Raw uint8 RGB `[B, H, W, 3]` (what the data pipeline yields with
`DataConfig(pixels="uint8")`) is normalised here, on the device, as the host would (to an ulp).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.models.common import numerics
from openvla_jax.models.config import VLAConfig, as_config
from openvla_jax.models.preprocess import FUSED_MEAN, FUSED_STD
from openvla_jax.models.vit import ViT, ViTConfig, tower_from_config

Array = jax.Array


def to_nhwc(pixel_values, channels: int = 6, size: Optional[int] = None):
    """HF/PyTorch NCHW `[B, C, H, W]` -> NHWC `[B, H, W, C]`, checking the channel count (and the
    image size when given). Works on NumPy and JAX arrays."""
    shape = tuple(pixel_values.shape)
    want = f"[B, {channels}, {size or 'H'}, {size or 'W'}]"
    if len(shape) != 4 or shape[1] != channels or (size is not None and shape[2:] != (size, size)):
        raise ValueError(f"expected NCHW pixel_values {want}, got shape {shape}")
    xp = jnp if isinstance(pixel_values, jax.Array) else np
    return xp.transpose(pixel_values, (0, 2, 3, 1))


class VisionBackbone(nn.Module):
    """`featurizer` (DINOv2) and optional `fused_featurizer` (SigLIP). `[B, H, W, 3 or 6] -> [B, N, D]`."""

    featurizer_config: ViTConfig
    fused_config: Optional[ViTConfig] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    take_block: int = -2  # which block's output the featurizers return (negative: from the end)

    def setup(self):
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
        )
        self.featurizer = ViT(self.featurizer_config, **kw)
        self.fused_featurizer = ViT(self.fused_config, **kw) if self.fused_config is not None else None

    @property
    def channels(self) -> int:
        return 6 if self.fused_config is not None else 3

    @property
    def embed_dim(self) -> int:
        d = self.featurizer_config.embed_dim
        return d + (self.fused_config.embed_dim if self.fused_config is not None else 0)

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values `[B, H, W, 6]` (fused) or `[B, H, W, 3]`, normalised float, or raw uint8
        `[B, H, W, 3]` -> patch features `[B, N, D]`."""
        if pixel_values.dtype == jnp.uint8:
            pixel_values = normalize_pixels(pixel_values)[..., : self.channels]
        size = self.featurizer_config.img_size
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.channels:
            raise ValueError(
                f"expected NHWC pixel_values [B, {size}, {size}, {self.channels}], got shape {pixel_values.shape}"
                + (
                    "; NCHW input goes through openvla_jax.models.vision.to_nhwc"
                    if pixel_values.ndim == 4 and pixel_values.shape[1] == self.channels
                    else ""
                )
            )
        feats = self.featurizer.features(pixel_values[..., :3], block=self.take_block)
        if self.fused_featurizer is None:
            return feats
        fused = self.fused_featurizer.features(pixel_values[..., 3:], block=self.take_block)
        return jnp.concatenate([feats, fused.astype(feats.dtype)], axis=-1)


def normalize_pixels(images: Array) -> Array:
    """uint8 `[..., H, W, 3]` -> float32 `[..., H, W, 6]` (DINOv2 channels, then SigLIP channels): the
    same float32 formula as the pipeline's and `preprocess.normalize_uint8` (XLA may fold the division)."""
    if images.shape[-1] != 3:
        raise ValueError(f"expected raw uint8 images [..., H, W, 3], got shape {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    return (jnp.concatenate([x, x], axis=-1) - jnp.asarray(FUSED_MEAN)) / jnp.asarray(FUSED_STD)


def from_config(model_config: VLAConfig, **overrides) -> VisionBackbone:
    """The backbone of a model config: `vision.featurizer` and, when present,
    `vision.fused_featurizer`, at `vision.image_size`, with the model's numerics."""
    config = as_config(model_config)
    vc = config.vision
    fused = vc.fused_featurizer
    kwargs: dict[str, Any] = dict(
        featurizer_config=tower_from_config(vc.featurizer, vc.image_size),
        fused_config=tower_from_config(fused, vc.image_size) if fused is not None else None,
    )
    kwargs.update(numerics(config, **overrides))
    return VisionBackbone(**kwargs)


def feature_dim(model_config: VLAConfig) -> int:
    """Width of the backbone's output features (the projector's input): 2176 for OpenVLA-7B."""
    return from_config(model_config).embed_dim
