"""The OpenVLA-OFT additions: a proprioception token and a continuous action head.

`ProprioProjector`: proprio `[B, P]` -> one LLM token `[B, 1, D]`: fc1 [P -> D] -> GELU -> fc2 [D -> D]
(as OpenVLA-OFT's ProprioProjector). It is placed after the image patches.

`L1ActionHead`: the last hidden states of the K x A action positions `[B, K * A, D]` -> actions
`[B, K, A]`. Each chunk step's A hidden states are concatenated (`[B, K, A * D]`), then
LayerNorm -> fc_in [A D -> H] -> ReLU -> `num_blocks` residual blocks (LayerNorm, Dense, ReLU) ->
LayerNorm -> fc_out [H -> A] (OFT's MLPResNet; H = D by default). Trained with an L1 loss on the
normalised actions; the output is in the normalised action space, unnormalised like decoded tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvla_jax.models.common import partitioned


def _dense(features: int, names: tuple[str, Optional[str]], dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        kernel_init=partitioned(nn.initializers.lecun_normal(), names),
        bias_init=partitioned(nn.initializers.zeros_init(), names[1:]),
    )


def _norm(dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)),
    )


class ProprioProjector(nn.Module):
    proprio_dim: int
    llm_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, proprio: jax.Array) -> jax.Array:
        """`[B, P]` -> `[B, 1, D]`."""
        if proprio.ndim != 2 or proprio.shape[-1] != self.proprio_dim:
            raise ValueError(f"proprio must be [B, {self.proprio_dim}], got shape {proprio.shape}")
        x = _dense(self.llm_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(proprio)
        x = nn.gelu(x, approximate=False)
        x = _dense(self.llm_dim, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(x)
        return x[:, None, :]


class L1ActionHead(nn.Module):
    action_dim: int
    hidden_dim: int
    num_blocks: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden `[B, K * A, D]` -> actions `[B, K, A]` (fp32)."""
        b, n, d = hidden.shape
        a = self.action_dim
        if n % a:
            raise ValueError(f"{n} action positions are not a multiple of action_dim={a}")
        x = hidden.reshape(b, n // a, a * d)
        x = _norm(self.dtype, self.param_dtype, "norm_in")(x)
        x = nn.relu(_dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc_in")(x))
        for i in range(self.num_blocks):
            y = _norm(self.dtype, self.param_dtype, f"block{i}_norm")(x)
            x = x + nn.relu(_dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, f"block{i}_fc")(y))
        x = _norm(self.dtype, self.param_dtype, "norm_out")(x)
        return _dense(a, ("mlp", None), self.dtype, self.param_dtype, "fc_out")(x).astype(jnp.float32)
