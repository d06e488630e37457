"""The training state: one pytree, so it can be jitted, donated, sharded and checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


def key_data(rng) -> jax.Array:
    """A typed key (`jax.random.key`) or raw uint32 key -> raw uint32 key data (checkpointable)."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 [] jax.Array, updates applied so far (the lr schedule's argument); or its sharding
    params: Any  # fp32 master parameters (unboxed)
    opt_state: Any  # optax state (no entries for frozen parameters)
    rng: Any  # uint32 key data jax.Array; per-step keys are fold_in(rng, step); or its sharding

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, rng) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=key_data(rng))

    def step_key(self) -> jax.Array:
        """A typed key for this step (dropout etc.): fold_in(rng, step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
