"""LoRA: low-rank adapters as a separate params tree, applied inside the forward pass.

    adapters = init_lora(base, LoraConfig(), rng)       # {path: {"A": [.., in, r], "B": [.., r, out]}}
    with adapted():                                      # every adapted layer: x W + (alpha/r) (x A) B
        logits = module.apply({"params": attach(base, adapters)}, ...)

The original (OpenVLA's `vla-scripts/finetune.py`, PEFT): rank 32, alpha 16, dropout 0,
`target_modules="all-linear"` (every nn.Linear of the vision towers, projector and LLM except
`lm_head`; the patch embeddings are Conv2d, not linear), `init_lora_weights="gaussian"`:
A ~ N(0, (1/r)^2), B = 0, so the adapted model starts equal to the base.

Kernel layouts -> (input dims I, output dims O), A `[prod(I), r]`, B `[r, prod(O)]`:
  nn.Dense `[in, out]`                                  I = in
  q/k/v_proj `[D, H, Dh]`, ViT qkv `[D, 3, H, Dh]`,     I = D (first dim), O = the rest
    attn_pool q `[D, H, Dh]` / kv `[D, 2, H, Dh]`
  o_proj / ViT attn proj / attn_pool proj `[H, Dh, D]`  I = (H, Dh), O = D (last dim)
i.e. output projections (module named `o_proj` or `proj`) contract every dim but the last, every
other kernel contracts its first dim -- as torch's Linear sees them flattened. A stacked (nn.scan)
kernel has a leading layer axis (path component `layers` / `blocks`), kept as a batch axis of A and B.

Unmerged, as PEFT runs it: `attach` puts A and B beside their kernel (`<layer>/lora_A`, `lora_B`;
nn.scan slices them per layer like the kernel) and `adapted()` intercepts every nn.Dense /
nn.DenseGeneral call that has them: y = x W + s (x A) B, computed in the layer's compute dtype. The
base is a frozen jit argument, so no gradient of W is ever formed: the backward pass computes
dx = dy W^T and the gradients of A and B (`[in, r]`, `[r, out]`), nothing kernel-sized. A quantized
base (`quant/frozen.py`: int8, grouped int4) is dequantized in the same interceptor, one layer at a
time inside the step.

Parameters trained in full beside the adapters (`LoraConfig.full`, e.g. OpenVLA-OFT's new action head
and proprio projector) are entries `{path: {"W": array}}` of the same tree: not in the frozen base,
put at their own path by `attach`, merged into an export as they are.

  merge: W' = W + (alpha / r) * (A @ B).reshape(W.shape)    fp32, cast to W's dtype; export only
Dropout > 0 is refused (the original recipe uses 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from openvla_jax.models import kernels
from openvla_jax.quant.frozen import frozen_linear, is_frozen_quant
from openvla_jax.train.optimizer import param_paths
from openvla_jax.train.state import TrainState, key_data
from openvla_jax.train.step import forward_sums, guarded_update, select_batch

ADAPTERS_FILE = "adapters.npz"
CONFIG_FILE = "lora_config.json"
LORA_A, LORA_B = "lora_A", "lora_B"  # A and B beside their kernel in the tree `attach` builds


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`target` / `exclude`: regexes `re.fullmatch`ed against '/'-joined param paths; a kernel is
    adapted when it matches `target` and not `exclude`. Defaults: every linear kernel but lm_head (and
    the conv patch embeddings). `full`: parameters trained in full instead (not adapted, not in the
    frozen base), e.g. OpenVLA-OFT's new heads: `(proprio_projector|action_head)/.*`; "" for none."""

    rank: int = 32
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r".*/kernel"
    exclude: str = r".*(lm_head|patch_embed)/kernel"
    full: str = ""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.dropout != 0.0:
            raise ValueError(f"LoRA dropout {self.dropout} is not supported; use 0.0 as the original recipe")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoraConfig":
        """From `to_dict()` or a config section (one written before `full` existed has none)."""
        return cls(**dict(d))


def _split(path: str, shape) -> tuple[int, int, int]:
    """-> (stack dims 0/1, number of input dims, number of output dims) of a kernel (`models.kernels`)."""
    try:
        layout = kernels.kernel_layout(path.split("/"), shape)
    except ValueError as e:
        raise ValueError(f"LoRA target {e}; narrow LoraConfig.target") from None
    return layout.stack, layout.n_in, layout.n_out


def _shapes(params) -> dict:
    """'/'-joined path -> shape of every leaf (params boxed or not, arrays or shapes)."""
    params = nn.meta.unbox(params)
    return {p: tuple(x.shape) for p, x in zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params))}


def full_targets(params, cfg: LoraConfig) -> dict:
    """'/'-joined path -> shape, for every parameter trained in full (`cfg.full`); {} without."""
    if not cfg.full:
        return {}
    full = re.compile(cfg.full)
    out = {p: s for p, s in _shapes(params).items() if full.fullmatch(p)}
    if not out:
        raise ValueError(f"LoraConfig.full {cfg.full!r} matches no parameter of this model")
    return out


def targets(params, cfg: LoraConfig) -> dict:
    """'/'-joined path -> kernel shape, for every adapted kernel (params boxed or not, arrays or shapes)."""
    shapes = _shapes(params)
    target, exclude = re.compile(cfg.target), re.compile(cfg.exclude) if cfg.exclude else None
    full = full_targets(params, cfg)
    out = {
        p: s
        for p, s in shapes.items()
        if target.fullmatch(p) and not (exclude and exclude.fullmatch(p)) and p not in full
    }
    if not out:
        raise ValueError(
            f"LoRA target {cfg.target!r} (exclude {cfg.exclude!r}) matches no parameter; paths look "
            f"like {list(shapes)[:3]}"
        )
    return out


def adapter_shapes(path: str, shape, rank: int) -> tuple[tuple, tuple]:
    """-> (A shape `[stack.., prod(in), r]`, B shape `[stack.., r, prod(out)]`)."""
    stack, n_in, _ = _split(path, shape)
    lead, body = tuple(shape[:stack]), tuple(shape[stack:])
    return lead + (math.prod(body[:n_in]), rank), lead + (rank, math.prod(body[n_in:]))


def init_lora(params, cfg: LoraConfig, rng, full_values: Optional[Mapping] = None) -> dict:
    """-> adapters `{path: {"A": ..., "B": ...}}` (fp32): A ~ N(0, (1/r)^2) (PEFT "gaussian"), B = 0;
    and `{path: {"W": full_values[path]}}` (fp32) for the parameters trained in full (`cfg.full`).
    `params` only supplies shapes (works under `jax.eval_shape`)."""
    out = {}
    for i, (path, shape) in enumerate(sorted(targets(params, cfg).items())):
        a_shape, b_shape = adapter_shapes(path, shape, cfg.rank)
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32) / cfg.rank
        out[path] = {"A": a, "B": jnp.zeros(b_shape, jnp.float32)}
    full = full_targets(params, cfg)
    missing = sorted(set(full) - set(full_values or {}))
    if missing:
        raise ValueError(f"no initial values given for the parameters trained in full: {missing[:3]}")
    for path, shape in full.items():
        w = jnp.asarray(full_values[path], jnp.float32)  # pyright: ignore[reportOptionalSubscript]
        if tuple(w.shape) != shape:
            raise ValueError(f"initial value of {path}: want shape {shape}, got {tuple(w.shape)}")
        out[path] = {"W": w}
    return out


def abstract_adapters(params, cfg: LoraConfig) -> dict:
    """The adapters' tree as ShapeDtypeStruct (no memory), e.g. for `train.optimizer.make_optimizer`."""
    full = full_targets(params, cfg)
    return jax.eval_shape(
        lambda key: init_lora(params, cfg, key, {p: jnp.zeros(s, jnp.float32) for p, s in full.items()}),
        jax.random.key(0),
    )


def delta(shape, a, b, scale: float, xp=jnp):
    """(alpha/r) * A @ B reshaped to the kernel's `shape` (fp32), in the array module `xp` (jnp: traced,
    on device; np: on the host). A stack axis (if any) is a batch axis of the matmul and leads the
    reshape alike."""
    a, b = xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)
    ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) if xp is jnp else np.matmul(a, b)
    return (scale * ab).reshape(shape)


# --------------------------------------------------------------------------------- the tree by path
def flat_params(tree) -> dict:
    """Nested mappings -> {'/'-joined path: leaf} (a leaf: anything not a mapping)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            p = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                walk(v, p)
            else:
                out[p] = v

    walk(nn.meta.unbox(tree), "")
    return out


def nest_params(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    from openvla_jax.convert.mapping import unflatten_params

    return unflatten_params((path.split("/"), v) for path, v in flat.items())


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def attach(base, adapters: dict) -> dict:
    """-> the params tree the adapted forward applies (under `adapted`): the frozen base with each
    adapter's A and B beside its kernel (`<layer>/lora_A`, `<layer>/lora_B`) and each `W` at its own
    path. Pure and jittable; the base's leaves are shared, not copied."""
    flat = flat_params(base)
    for path, ad in adapters.items():
        if "W" in ad:
            flat[path] = ad["W"]
        else:
            flat[f"{_parent(path)}/{LORA_A}"], flat[f"{_parent(path)}/{LORA_B}"] = ad["A"], ad["B"]
    return nest_params(flat)


# ----------------------------------------------------------------------------- the adapted forward
def _dense_axes(mod) -> int:
    """How many trailing input axes an nn.Dense / nn.DenseGeneral contracts (the kernel's input dims)."""
    if isinstance(mod, nn.DenseGeneral):
        axis = tuple(int(a) for a in (mod.axis if isinstance(mod.axis, tuple) else (mod.axis,)))  # pyright: ignore[reportArgumentType]
        if mod.batch_dims or sorted(axis) != list(range(-len(axis), 0)):
            raise ValueError(f"{'/'.join(mod.path)}: LoRA adapts DenseGeneral over trailing axes only, got {axis}")
        return len(axis)
    return 1


def _out_shape(mod) -> tuple:
    f = mod.features
    return tuple(f) if isinstance(f, (tuple, list)) else (f,)


def _intercept(scale: float):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        p = mod.variables.get("params", {})
        quantized = is_frozen_quant(p.get("kernel"))
        if LORA_A not in p and not quantized:
            return next_fun(*args, **kwargs)
        x = args[0]
        n_in = _dense_axes(mod)
        dtype = mod.dtype or jnp.result_type(x)
        if quantized:  # the frozen int8 / int4 kernel, dequantized here, one layer at a time
            y = frozen_linear(x, p["kernel"], n_in, _out_shape(mod), dtype)
            if "bias" in p:
                y = y + jnp.asarray(p["bias"], dtype)
        else:
            y = next_fun(*args, **kwargs)
        if LORA_A in p:  # + s (x A) B: the scale on the rank-r activations, the cheapest place
            xf = jnp.asarray(x, dtype).reshape(*x.shape[: x.ndim - n_in], -1)
            h = (xf @ jnp.asarray(p[LORA_A], dtype)) * jnp.asarray(scale, dtype)
            y = y + (h @ jnp.asarray(p[LORA_B], dtype)).reshape(y.shape).astype(y.dtype)
        return y

    return intercept


@contextlib.contextmanager
def adapted(cfg: LoraConfig):
    """Inside this block (while tracing), every nn.Dense / nn.DenseGeneral whose params hold `lora_A`
    / `lora_B` (`attach`) returns x W + (alpha/r) (x A) B, and one whose kernel is a quantized entry
    (`quant/frozen.py`) dequantizes it next to its matmul. Other layers run as they are."""
    with nn.intercept_methods(_intercept(cfg.scale)):
        yield


def adapted_apply(module, base, adapters: dict, cfg: LoraConfig, *args, **kwargs):
    """`module.apply` of the adapted model, unmerged: the base (float or quantized) with the adapters."""
    with adapted(cfg):
        return module.apply({"params": attach(base, adapters)}, *args, **kwargs)


def merge(params, adapters: dict, cfg: LoraConfig, xp=jnp):
    """-> params with every adapted kernel W replaced by W + (alpha/r) A @ B (W's dtype) and every
    parameter trained in full set to its `W` (added where `params` lacks it: a new head); other leaves
    are returned as they are (the same objects). `xp=jnp`: pure and jittable; `xp=np`: on the host,
    one kernel at a time, nothing on the device (exporting a 7B model). For export and evaluation:
    training never merges (`adapted`)."""
    flat = flat_params(params)
    missing = [p for p, ad in adapters.items() if "W" not in ad and p not in flat]
    if missing:
        raise ValueError(f"adapters for parameters the model does not have: {missing[:3]}")
    for path, ad in adapters.items():
        if "W" in ad:
            old = flat.get(path)
            flat[path] = xp.asarray(ad["W"], old.dtype if old is not None else xp.float32)
            continue
        w = xp.asarray(flat[path])
        flat[path] = (w.astype(xp.float32) + delta(w.shape, ad["A"], ad["B"], cfg.scale, xp)).astype(w.dtype)
    return nest_params(flat)


def count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def trainable_count(model_config, cfg: LoraConfig = LoraConfig()) -> tuple[int, int]:
    """-> (adapter parameters, base parameters) of a `configs/model.py` config, from `jax.eval_shape`
    (no memory: the 7B model's shapes only)."""
    from openvla_jax.models import vla
    from openvla_jax.train.step import abstract_params

    base = nn.meta.unbox(abstract_params(vla.from_config(model_config, param_dtype="float32")))
    return count(abstract_adapters(base, cfg)), count(base)


# ------------------------------------------------------------------------------------- training
def _names(boxed_params) -> dict:
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves = jax.tree.leaves(boxed_params, is_leaf=is_box)
    paths = jax.tree.leaves(param_paths(boxed_params))
    return {p: (x.names if is_box(x) else None) for p, x in zip(paths, leaves)}


def adapter_shardings(boxed_params, cfg: LoraConfig, mesh, rules=None) -> dict:
    """-> `{path: {"A": NamedSharding, "B": NamedSharding}}`: each adapter sharded by the logical axis
    rules + FSDP (`parallel.sharding.spec_for`) as its kernel is: A `[stack.., in, r]` takes the
    kernel's first input axis name, B `[stack.., r, out]` its first output axis name (`models.kernels`
    says which are which), a stack axis stays `layers`, the rank axis has none; a `W` entry is sharded
    as its parameter. `boxed_params`: the model's boxed abstract params (`train.step.abstract_params`);
    unboxed ones give replicated + FSDP."""
    from jax.sharding import NamedSharding

    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.sharding import spec_for

    rules = R.RULES if rules is None else rules
    names = _names(boxed_params)
    out = {}
    for path, shape in targets(boxed_params, cfg).items():
        stack, n_in, _ = _split(path, shape)
        a_shape, b_shape = adapter_shapes(path, shape, cfg.rank)
        n = tuple(names[path] or (None,) * len(shape))
        lead = n[:stack]
        a_names, b_names = lead + (n[stack], None), lead + (None, n[stack + n_in])
        out[path] = {
            "A": NamedSharding(mesh, spec_for(a_shape, a_names, mesh, rules)),
            "B": NamedSharding(mesh, spec_for(b_shape, b_names, mesh, rules)),
        }
    for path, shape in full_targets(boxed_params, cfg).items():
        out[path] = {"W": NamedSharding(mesh, spec_for(shape, names[path], mesh, rules))}
    return out


def frozen_base_shardings(
    boxed_params, cfg: LoraConfig, mesh, rules=None, quant: Optional[str] = None, group_size=None
):
    """Shardings of the frozen base (`frozen_base`'s tree: the model's params less those trained in
    full): float leaves as the model's params (rules + FSDP); a quantized kernel's leaves keep the
    kernel's scan axis name and take FSDP on their largest divisible axis."""
    from jax.sharding import NamedSharding

    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.sharding import spec_for

    rules = R.RULES if rules is None else rules
    names, kernel_shapes = _names(boxed_params), _shapes(boxed_params)
    shapes = abstract_base(boxed_params, cfg, jnp.float32, quant, group_size)

    def one(path, x):
        if path in names:
            return NamedSharding(mesh, spec_for(x.shape, names[path], mesh, rules))
        kernel = _parent(path)  # a leaf of a quantized entry: only its scan axis keeps its name
        stack = kernels.kernel_layout(kernel.split("/"), kernel_shapes[kernel]).stack
        n = tuple(names[kernel] or (None,) * stack)[:stack] + (None,) * (len(x.shape) - stack)
        return NamedSharding(mesh, spec_for(x.shape, n, mesh, rules))

    return nest_params({p: one(p, x) for p, x in flat_params(shapes).items()})


def abstract_base(boxed_params, cfg: LoraConfig, dtype, quant: Optional[str] = None, group_size=None):
    """The frozen base as ShapeDtypeStruct: the model's params less those trained in full, in `dtype`,
    linear kernels quantized when `quant` is "int8" / "int4" (`quant/frozen.py`)."""
    from openvla_jax.quant.frozen import abstract_frozen
    from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE

    full = full_targets(boxed_params, cfg)
    flat = {p: jax.ShapeDtypeStruct(x.shape, dtype) for p, x in flat_params(boxed_params).items() if p not in full}
    tree = nest_params(flat)
    if quant and quant != "none":
        tree = abstract_frozen(tree, quant, DEFAULT_GROUP_SIZE if group_size is None else group_size)
    return tree


def frozen_base(params, cfg: LoraConfig, dtype, quant: Optional[str] = None, group_size=None):
    """Host params (NumPy) -> the frozen base on the host: the leaves trained in full dropped, the rest
    in `dtype`, linear kernels quantized when `quant` is "int8" / "int4" (from the fp32 values)."""
    from openvla_jax.quant.frozen import quantize_frozen
    from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE

    full = re.compile(cfg.full) if cfg.full else None  # a base may lack them all (new heads)
    flat = {p: x for p, x in flat_params(params).items() if not (full and full.fullmatch(p))}
    tree = nest_params(flat)
    if quant and quant != "none":
        tree = quantize_frozen(tree, quant, DEFAULT_GROUP_SIZE if group_size is None else group_size)
    dt = np.dtype(jnp.dtype(dtype))  # quantized entries keep int8 values and fp32 scales
    return jax.tree.map(lambda x: x if is_frozen_quant(x) else np.asarray(x, dt), tree, is_leaf=is_frozen_quant)


def lora_state_shardings(boxed_params, cfg: LoraConfig, optimizer: optax.GradientTransformation, mesh, rules=None):
    """A TrainState of NamedSharding for an adapters-only state: adapters by `adapter_shardings`, their
    optimizer state mirrors them, step and RNG replicated."""
    from openvla_jax.parallel.sharding import opt_state_shardings, replicated

    a_sh = adapter_shardings(boxed_params, cfg, mesh, rules)
    o_sh = opt_state_shardings(optimizer, abstract_adapters(boxed_params, cfg), a_sh, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, params=a_sh, opt_state=o_sh, rng=rep)


def init_lora_state(
    base_params,
    cfg: LoraConfig,
    optimizer: optax.GradientTransformation,
    rng,
    shardings: Optional[TrainState] = None,
    full_values: Optional[Mapping] = None,
) -> TrainState:
    """A TrainState whose params are the adapters only (the optimizer state covers them alone).
    `base_params` supplies shapes only (the model's params: arrays, ShapeDtypeStruct, boxed or not);
    `full_values`: initial values of the parameters trained in full (`cfg.full`). With `shardings`
    (`lora_state_shardings`) the state is created already sharded, with the same values."""
    rng = key_data(rng)
    if shardings is None:
        adapters = init_lora(base_params, cfg, jax.random.wrap_key_data(rng), full_values)
        return TrainState.create(adapters, optimizer, rng)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(base_params))
    values = {p: np.asarray(v, np.float32) for p, v in (full_values or {}).items()}

    def init(key, values):
        return TrainState.create(init_lora(shapes, cfg, jax.random.wrap_key_data(key), values), optimizer, key)

    w_sh = {p: s["W"] for p, s in shardings.params.items() if "W" in s}
    return jax.jit(init, in_shardings=(shardings.rng, {p: w_sh[p] for p in values}), out_shardings=shardings)(
        rng, values
    )


def make_lora_train_step(
    module,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable,
    cfg: LoraConfig,
    *,
    mesh=None,
    rules=None,
    num_datasets: int = 1,
    supervised_tokens: Optional[int] = None,
    state_shardings: Optional[TrainState] = None,
    base_shardings=None,
    donate: bool = True,
    compiler_options: Optional[dict] = None,
) -> Callable:
    """-> `step(state, base_params, batch, expected_step=None) -> (state, metrics)`, jitted.

    `state.params` are the adapters; `base_params` are a frozen argument (no gradient, never donated,
    float in any dtype, or with quantized kernels: `frozen_base`), run unmerged (`adapted`).
    batch: pixel_values `[B, S, S, 6]`, input_ids / attention_mask / labels `[B, T]`, optional
    dataset_index `[B]`. metrics: loss, action_accuracy, l1, tokens, ... (`train.loss.summarize`),
    grad_norm (of the adapter gradients), lr, finite. A non-finite loss or gradient leaves the state
    unchanged; `expected_step` makes that sticky (`train.step.guarded_update`).
    `mesh` (with the logical `rules`): jitted with in/out shardings on it like `train.step.make_train_step`:
    the state by `lora_state_shardings` (or `state_shardings`), the base by the rules + FSDP (or
    `base_shardings`: a quantized base needs `frozen_base_shardings(..., quant=)`), the batch over
    ("data", "fsdp"). Without a mesh: one device, shardings left to jit."""
    from contextlib import nullcontext

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.sharding import replicated
    from openvla_jax.train.step import _Context, abstract_params, mesh_context_safe

    def loss_fn(adapters, base, batch):
        with adapted(cfg):
            return forward_sums(module, attach(base, adapters), batch, num_datasets, mesh, supervised_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, base, batch, expected_step):
        base = jax.lax.stop_gradient(base)  # belt and braces: the base is not an argument of grad_fn's
        (loss_sum, sums), grads = grad_fn(state.params, base, batch)
        return guarded_update(state, grads, loss_sum, sums, optimizer, lr_schedule, expected_step)

    donated = (0,) if donate else ()
    shardings = None
    if mesh is None:
        context = nullcontext()
        jitted = jax.jit(train_step, donate_argnums=donated, compiler_options=compiler_options)
    else:
        rules = R.RULES if rules is None else rules
        boxed = abstract_params(module)
        shardings = state_shardings or lora_state_shardings(boxed, cfg, optimizer, mesh, rules)
        base_shardings = base_shardings or frozen_base_shardings(boxed, cfg, mesh, rules)
        context = _Context(mesh, rules, mesh_context_safe(boxed))
        jitted = jax.jit(
            train_step,
            in_shardings=(shardings, base_shardings, NamedSharding(mesh, P(R.BATCH_AXES)), replicated(mesh)),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=donated,
            compiler_options=compiler_options,
        )

    def step(state, base_params, batch, expected_step: Optional[int] = None):
        expected = jnp.asarray(-1 if expected_step is None else expected_step, jnp.int32)
        with context:
            return jitted(state, base_params, select_batch(batch), expected)

    def lower(state, base_params, batch):
        """`jax.stages.Lowered` for (abstract) arguments, traced as a call is (the AOT compile check)."""
        from openvla_jax.models.common import traced_for

        expected = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)) if mesh is not None else 0
        with context, traced_for(mesh) if mesh is not None else nullcontext():
            return jitted.lower(state, base_params, select_batch(batch), expected)

    step.jitted = jitted
    step.lower = lower
    step.shardings = shardings
    step.base_shardings = base_shardings
    return step


# ------------------------------------------------------------------------------------ save / export
def save_adapters(path, adapters: dict, cfg: LoraConfig) -> Path:
    """Adapters alone (7B x rank 32 in fp32: ~440 MB; the base is not copied), and the parameters
    trained in full: `path/adapters.npz` ('<param path>/A', '<param path>/B', '<param path>/W') +
    `path/lora_config.json`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {f"{p}/{k}": np.asarray(jax.device_get(v)) for p, ad in adapters.items() for k, v in ad.items()}
    tmp = path / (ADAPTERS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)  # pyright: ignore[reportArgumentType]  (numpy stubs: **kwds vs allow_pickle)
    tmp.replace(path / ADAPTERS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_adapters(path) -> tuple[dict, LoraConfig]:
    """-> (adapters as NumPy fp32, LoraConfig) written by `save_adapters`."""
    path = Path(path)
    if not (path / ADAPTERS_FILE).exists() or not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path}: expected {ADAPTERS_FILE} and {CONFIG_FILE} written by save_adapters")
    cfg = LoraConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    adapters: dict = {}
    with np.load(path / ADAPTERS_FILE) as z:
        for key in z.files:
            p, k = key.rsplit("/", 1)
            adapters.setdefault(p, {})[k] = z[key]
    bad = [p for p, ad in adapters.items() if set(ad) not in ({"A", "B"}, {"W"})]
    if bad:
        raise ValueError(f"{path}: entries {bad[:3]} hold neither A and B nor W")
    return adapters, cfg


def merge_and_export(
    base_dir,
    adapters: dict,
    cfg: LoraConfig,
    out_dir,
    norm_stats: Optional[dict] = None,
    model_config_updates: Optional[dict] = None,
) -> Path:
    """Base converted checkpoint + adapters -> a converted checkpoint with merged weights (the base's
    dtype, its tokenizer and hf_config; `norm_stats` replaces its dataset statistics when given, e.g.
    those of the fine-tuning dataset; `model_config_updates` are set on its model config, e.g. the
    image preprocessing the fine-tuning data had, or the OFT options of new heads trained in full),
    which `OpenVLA.load` reads and `scripts/convert.py to-hf` turns into PyTorch. Merged on the host in
    NumPy, one kernel at a time."""
    from openvla_jax.checkpoints.converted import load_converted, save_converted

    model_config, params, extras = load_converted(base_dir)
    model_config = model_config.replace(**(model_config_updates or {}))
    try:
        merged = merge(params, adapters, cfg, xp=np)
    except ValueError as e:
        raise ValueError(f"{base_dir}: {e}") from None
    tok = Path(base_dir) if extras["tokenizer_files"] else None
    return save_converted(
        out_dir,
        model_config,
        merged,
        norm_stats if norm_stats is not None else extras["norm_stats"],
        tok,
        extras["hf_config"] or None,
    )
