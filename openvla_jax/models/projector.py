"""Prismatic's projectors from vision features into Llama's embedding space.

`fused-gelu-mlp` (OpenVLA, for the fused DINOv2 + SigLIP backbone):
  fc1 [Dv -> 4 Dv] -> GELU -> fc2 [4 Dv -> Dl] -> GELU -> fc3 [Dl -> Dl]   (7B: 2176 -> 8704 -> 4096 -> 4096)
`gelu-mlp` (single backbone): fc1 [Dv -> Dl] -> GELU -> fc2 [Dl -> Dl].
GELU is the exact (erf) one, as torch.nn.GELU(). Shapes `[B, N, Dv] -> [B, N, Dl]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvla_jax.models.common import as_dtype, partitioned
from openvla_jax.models.config import VLAConfig, as_config

ARCHS = ("fused-gelu-mlp", "gelu-mlp")


def layer_dims(arch: str, vision_dim: int, llm_dim: int) -> list[tuple[int, int]]:
    """(in, out) of fc1, fc2[, fc3] for a projector arch."""
    if arch == "fused-gelu-mlp":
        return [(vision_dim, 4 * vision_dim), (4 * vision_dim, llm_dim), (llm_dim, llm_dim)]
    if arch == "gelu-mlp":
        return [(vision_dim, llm_dim), (llm_dim, llm_dim)]
    raise ValueError(f"unknown projector arch {arch!r}; expected one of {ARCHS}")


# Logical names per layer: the widening/first layer reads `embed`, writes `mlp`; the others reverse.
_NAMES = [("embed", "mlp"), ("mlp", "embed"), ("mlp", "embed")]


class Projector(nn.Module):
    vision_dim: int
    llm_dim: int
    arch: str = "fused-gelu-mlp"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.vision_dim:
            raise ValueError(f"projector expects features [..., {self.vision_dim}], got shape {x.shape}")
        dims = layer_dims(self.arch, self.vision_dim, self.llm_dim)
        for i, (_, out) in enumerate(dims):
            if i:
                x = nn.gelu(x, approximate=False)
            names = _NAMES[i]
            x = nn.Dense(
                out,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"fc{i + 1}",
                kernel_init=partitioned(nn.initializers.lecun_normal(), names),
                bias_init=partitioned(nn.initializers.zeros_init(), names[1:]),
            )(x)
        return x


def from_config(model_config: VLAConfig, vision_dim: int, **overrides) -> Projector:
    """The projector of a model config (`projector.arch`, `llm.hidden_size`), reading `vision_dim`
    from the backbone (`VisionBackbone.embed_dim`)."""
    config = as_config(model_config)
    kwargs: dict[str, Any] = dict(
        vision_dim=vision_dim,
        llm_dim=config.llm.hidden_size,
        arch=config.projector.arch,
        dtype=as_dtype(config.dtype),
        param_dtype=as_dtype(config.param_dtype),
    )
    kwargs.update(overrides)
    return Projector(**kwargs)
