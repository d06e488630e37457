"""Shardings of parameters, optimizer state and activations from logical axis names + the FSDP rule.

Parameters come boxed (`nn.LogicallyPartitioned`, from `jax.eval_shape(module.init, ...)`): the box's
logical names go through the rule table (`parallel.rules`, via flax's `logical_to_mesh_axes`), then
`rules.fit_spec` drops axes that are size 1 or do not divide, then `rules.add_fsdp` adds "fsdp".
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import optax
from flax.linen.spmd import logical_to_mesh_axes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from openvla_jax.parallel import rules as R


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def spec_for(shape: Sequence[int], names: Optional[Sequence], mesh: Mesh, rules=R.RULES) -> P:
    """Logical names (or None) of one parameter of `shape` -> its mesh PartitionSpec."""
    if names is None:
        logical = P(*([None] * len(shape)))
    else:
        logical = logical_to_mesh_axes(tuple(names), rules)
        assert logical is not None  # None only for names=None
        logical = P(*[None if e is nn.spmd._unassigned_axis else e for e in logical])  # unknown name: replicate
    spec = R.fit_spec(logical, shape, dict(mesh.shape))
    return R.add_fsdp(spec, shape, names, mesh.shape.get("fsdp", 1))


def param_specs(abstract_params, mesh: Mesh, rules=R.RULES):
    """Boxed (or plain) abstract params -> unboxed pytree of PartitionSpec."""

    def one(x):
        if _is_box(x):
            return spec_for(x.value.shape, x.names, mesh, rules)
        return spec_for(x.shape, None, mesh, rules)

    return jax.tree.map(one, abstract_params, is_leaf=_is_box)


def param_shardings(abstract_params, mesh: Mesh, rules=R.RULES):
    """Boxed abstract params -> unboxed pytree of NamedSharding (see module docstring for the rule)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract_params, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params, params_shardings, mesh: Mesh):
    """Shardings of `optimizer.init(params)`: leaves that mirror a parameter (Adam's mu/nu) get that
    parameter's sharding, everything else (step counts, scalars) is replicated.

    `abstract_params`: unboxed params (arrays or ShapeDtypeStruct); `params_shardings`: same tree."""
    abstract_params = nn.meta.unbox(abstract_params)
    state = jax.eval_shape(optimizer.init, abstract_params)
    rep = replicated(mesh)
    # optax walks the state and hands us, for each param-shaped subtree, the matching param leaves;
    # MaskedNode marks a frozen param (multi_transform / masked): no state there, keep the node.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(
        optimizer,
        lambda leaf, sharding: leaf if masked(leaf) else sharding,
        state,
        params_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=masked,
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Dim 0 over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(R.BATCH_AXES, *([None] * (ndim - 1))))


def describe(shardings: Any) -> dict:
    """'/'-joined path -> PartitionSpec, for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): s.spec for path, s in flat}
