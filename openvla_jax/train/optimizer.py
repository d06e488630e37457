"""AdamW with the OpenVLA recipe as the default, optional warmup-cosine, freezing by regex.

Recipe (OpenVLA's, from Prismatic's FSDP strategy): AdamW lr 2e-5 constant, no warmup, weight decay 0,
betas (0.9, 0.999), eps 1e-8 (torch defaults), gradient clip 1.0 on the global norm (torch's
`clip_grad_norm_`: g * min(1, max_norm / (norm + 1e-6))).

Weight decay mask (matters only when weight_decay > 0): as Prismatic, parameters with fewer than 2
dimensions or named `bias` are not decayed. Dimensions are counted without the stacked `layers`
axis of scanned models, so a scanned norm scale `[L, D]` stays undecayed, as torch sees it (`[D]`).

Freezing: `freeze` is a list of regexes matched (`re.match`, anchored at the start) against
'/'-joined parameter paths, e.g. "vision_backbone/.*". Frozen parameters get a zero update and no
optimizer state (optax.multi_transform with set_to_zero); the gradient clip and its norm see only the
trainable parameters (torch clips the parameters that have gradients).

Step decay (OpenVLA-OFT's `MultiStepLR`): `lr_decay_after` > 0 multiplies the schedule's lr by
`lr_decay_factor` (0.1, OFT's) from that many updates on; 0 (the default) never.

`frozen_dtype` ("float32" | "bfloat16"): the dtype frozen parameters are *stored* in inside the train
state (`cast_frozen`). They never get an update, so fp32 master copies buy nothing: bf16 halves
their memory (the 7B's vision towers, ~0.7B parameters: 2.8 GB -> 1.4 GB) and the bytes read per step.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "warmup_cosine")
_STACKED = ("layers", "blocks")  # module names of nn.scan stacks (models/llama.py, models/vit.py)

OptimizerConfig = (
    Any  # ml_collections.ConfigDict, `default_optimizer_config()` / `config.optimizer` (fields are dynamic)
)


def default_optimizer_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=2e-5,
            schedule="constant",
            warmup_steps=0,
            total_steps=0,
            end_lr_ratio=0.0,
            weight_decay=0.0,
            grad_clip=1.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            freeze=(),
            frozen_dtype="float32",
            accumulate_steps=1,
            lr_decay_after=0,  # > 0: lr x lr_decay_factor from this update on (OpenVLA-OFT's step decay)
            lr_decay_factor=0.1,
        )
    )


def make_schedule(cfg: OptimizerConfig) -> Callable:
    """step (number of updates done) -> learning rate (`cfg.schedule`, then the step decay)."""
    schedule = _base_schedule(cfg)
    after = int(cfg.get("lr_decay_after", 0) or 0)
    if after < 0:
        raise ValueError(f"optimizer.lr_decay_after={after}: expected 0 (no decay) or a number of updates")
    if not after:
        return schedule
    factor = float(cfg.get("lr_decay_factor", 0.1))
    return lambda step: schedule(step) * jnp.where(step >= after, factor, 1.0)


def _base_schedule(cfg: OptimizerConfig) -> Callable:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "warmup_cosine":
        if cfg.total_steps <= cfg.warmup_steps:
            raise ValueError(
                f"warmup_cosine needs total_steps > warmup_steps, got {cfg.total_steps} <= {cfg.warmup_steps}"
            )
        # As HF get_cosine_schedule_with_warmup: 0 -> lr linearly, then cosine to end_lr by total_steps.
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps, end_value=cfg.lr * cfg.end_lr_ratio
        )
    raise ValueError(f"unknown lr schedule {cfg.schedule!r}; expected one of {SCHEDULES}")


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def param_paths(params) -> dict:
    """Unboxed or boxed params -> same tree of '/'-joined path strings."""

    def key(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(key(k) for k in path), params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def trainable_mask(params, freeze: Sequence[str]):
    """params -> bool tree (True = trained). Raises if a freeze pattern matches no parameter (a typo)."""
    paths = param_paths(params)
    patterns = [re.compile(p) for p in freeze]
    for pat in patterns:
        if not any(pat.match(p) for p in jax.tree.leaves(paths)):
            raise ValueError(
                f"freeze pattern {pat.pattern!r} matches no parameter; paths look like {jax.tree.leaves(paths)[:3]}"
            )
    return jax.tree.map(lambda p: not any(pat.match(p) for pat in patterns), paths)


def decay_mask(params):
    """bool tree: True where weight decay applies (>= 2 dims not counting a scan axis, not a bias)."""

    def one(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if isinstance(leaf, nn.Partitioned):
            ndim = sum(n != "layers" for n in leaf.names)
        else:
            ndim = len(leaf.shape) - int(any(n in _STACKED for n in names[:-1]))
        return ndim >= 2 and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(cfg: OptimizerConfig, params) -> tuple[optax.GradientTransformation, Callable]:
    """-> (optax transformation over the params tree, lr schedule). `params`: boxed or unboxed, arrays or
    ShapeDtypeStruct (only the tree, names and shapes are read)."""
    schedule = make_schedule(cfg)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=nn.meta.unbox(decay_mask(params)) if cfg.weight_decay else None,
    )
    parts = ([clip_by_global_norm_torch(cfg.grad_clip)] if cfg.grad_clip else []) + [adamw]
    tx = optax.chain(*parts)
    if cfg.get("freeze"):
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, cfg.freeze))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, nn.meta.unbox(labels))
    return tx, schedule


def cast_frozen(params, cfg: OptimizerConfig):
    """params (arrays, unboxed) -> the same tree with the leaves `cfg.freeze` matches cast to
    `cfg.frozen_dtype`; trainable leaves untouched. A no-op without freeze patterns or for float32.
    Sharded arrays keep their sharding (astype is elementwise)."""
    name = cfg.get("frozen_dtype", "float32")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"optimizer.frozen_dtype={name!r}; expected 'float32', 'bfloat16' or 'float16'")
    if not cfg.get("freeze") or name == "float32":
        return params
    dtype = jnp.dtype(name)
    return jax.tree.map(
        lambda x, trained: x if trained else x.astype(dtype), params, trainable_mask(params, cfg.freeze)
    )
