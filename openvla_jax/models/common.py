"""Small pieces shared by every model file: dtypes, named remat policies, attention."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.models.config import as_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Remat policies by name, as MaxText names them in config. "none" means no rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}

ATTENTION_IMPLS = ("xla", "dpa", "cudnn")

# The platform a program is traced for when it is not the host's (an ahead-of-time compile for a
# GPU mesh on a CPU machine): set from the mesh's devices by `traced_for`.
_PLATFORM = contextvars.ContextVar("openvla_jax_platform", default=None)


@contextlib.contextmanager
def traced_for(mesh):
    """Trace for the platform of `mesh`'s devices (not `jax.default_backend()`) inside this block."""
    token = _PLATFORM.set(mesh.devices.flat[0].platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def target_platform() -> str:
    """The platform being traced for ("gpu", "tpu", "cpu"; see `traced_for`), else the host's backend."""
    return _PLATFORM.get() or jax.default_backend()


def as_dtype(name_or_dtype) -> jnp.dtype:
    """'bfloat16' | jnp.bfloat16 -> jnp dtype, with an error that lists the choices."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype)


def numerics(model_config, **overrides) -> dict:
    """Numerics every part of a model config shares (`models/config.py` Numerics: dtype, param_dtype,
    scan_layers, remat_policy, attention_impl), with `overrides` applied and dtypes given by name resolved."""
    kwargs = dataclasses.asdict(as_config(model_config).numerics)
    kwargs.update(overrides)
    kwargs["dtype"], kwargs["param_dtype"] = as_dtype(kwargs["dtype"]), as_dtype(kwargs["param_dtype"])
    return kwargs


def partitioned(init, names):
    """`nn.with_logical_partitioning(init, names)` with the box's own constraint switched off.

    Shardings of parameters come from `openvla_jax.parallel.sharding` (rules + FSDP); the box only
    carries the names. Without `rules=()`, flax's apply-time shape check re-runs every initializer
    and `nn.DenseGeneral` unboxes its *flattened* kernel under the box's constraint, which fails for
    multi-axis kernels (q/k/v/o, ViT qkv) as soon as a mesh and axis rules are active."""
    import flax.linen as nn

    return nn.with_logical_partitioning(init, names, rules=())


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array],
    *,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H a multiple of K; mask: bool [B, 1, T, S] (True =
    attend) or None. Returns [B, T, H, Dh] in q's dtype. The "xla" path computes logits and softmax
    in fp32 (as HF's eager attention does); "dpa"/"cudnn" go through jax.nn.dot_product_attention
    (XLA's fused kernel / cuDNN flash attention; "cudnn" needs a GPU and bf16 or fp16 inputs).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise ValueError(f"{h} query heads is not a multiple of {kv_heads} key/value heads")
    if impl == "cudnn" and target_platform() != "gpu":
        # jax would fail deep inside lowering; say what to pick instead (same results: tested).
        raise ValueError(
            f"attention_impl='cudnn' (cuDNN flash attention) needs a GPU; this backend is "
            f"{target_platform()!r}: use 'dpa' (jax.nn.dot_product_attention, XLA) or 'xla'"
        )
    if impl != "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "dpa" else "cudnn")
    groups = h // kv_heads
    qg = q.reshape(b, t, kv_heads, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * np.float32(1.0 / np.sqrt(d))
    if mask is not None:
        # mask [B, 1|H, T, S] -> [B, 1|K, 1|G, T, S]
        m = (
            mask.reshape(mask.shape[0], -1, 1, t, mask.shape[-1])
            if mask.shape[1] == 1
            else (mask.reshape(mask.shape[0], kv_heads, groups, t, mask.shape[-1]))
        )
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
