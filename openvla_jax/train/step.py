"""The jitted, sharded train step (and eval step), and a train state created already sharded.

bf16 compute with fp32 master params: build the module with `models.vla.from_config(model_config,
dtype="bfloat16")` (param_dtype float32); flax casts each weight to bf16 at use, gradients arrive
in fp32 for the fp32 params. Gradient accumulation scans over `accumulate_steps` microbatches and
sums gradients of the *summed* token loss, dividing once by the total supervised-token count: the
result equals one step on the whole batch (up to float summation order).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from openvla_jax.models.config import as_config
from openvla_jax.parallel import rules as R
from openvla_jax.parallel.sharding import opt_state_shardings, param_shardings, replicated
from openvla_jax.train.loss import (
    SUM_KEYS,
    action_targets,
    continuous_sums,
    loss_and_sums,
    summarize,
    supervised_positions,
)
from openvla_jax.train.optimizer import trainable_mask
from openvla_jax.train.state import TrainState, key_data

# For CPU tests / demos: about half the compile time of a tiny step, slower code.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "dataset_index", "action", "proprio")


def sample_inputs(module, batch: int = 1, length: int = 8):
    """Abstract (pixel_values `[B, S, S, C]` (`[B, N, S, S, C]` for N cameras), input_ids `[B, L]`)
    for `module.init` under eval_shape."""
    vb = module.vision_backbone
    size = vb.featurizer_config.img_size
    cams = () if module.num_images == 1 else (module.num_images,)
    return (
        jax.ShapeDtypeStruct((batch, *cams, size, size, vb.channels), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )


def abstract_params(module) -> dict:
    """Boxed abstract params (ShapeDtypeStruct inside nn.LogicallyPartitioned): no memory used."""
    return jax.eval_shape(module.init, jax.random.key(0), *sample_inputs(module))["params"]


def train_state_shardings(module, optimizer: optax.GradientTransformation, mesh: Mesh, rules=R.RULES) -> TrainState:
    """A TrainState of NamedSharding: params by the rules + FSDP, opt state mirrors params, rest replicated."""
    boxed = abstract_params(module)
    p_sh = param_shardings(boxed, mesh, rules)
    o_sh = opt_state_shardings(optimizer, boxed, p_sh, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep)


def _check_params(params, boxed, where: str):
    want = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    bad = [
        f"{jax.tree_util.keystr(k)}: want {v.shape}, got {'missing' if k not in got else got[k].shape}"
        for k, v in want
        if k not in got or tuple(got[k].shape) != tuple(v.shape)
    ]
    extra = set(got) - {k for k, _ in want}
    if bad or extra:
        raise ValueError(
            f"{where} do not fit the model: "
            + "; ".join(bad[:5] + [f"unexpected {jax.tree_util.keystr(k)}" for k in list(extra)[:5]])
            + (f" (and {len(bad) + len(extra) - 10} more)" if len(bad) + len(extra) > 10 else "")
        )


def init_train_state(
    module,
    model_config,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    rng,
    sample_batch_shapes=None,
    params=None,
    compiler_options: Optional[dict] = None,
) -> TrainState:
    """A TrainState created already sharded (never the whole model on one device or host).

    Without `params`: `module.init` runs under jit with out_shardings. With `params` (NumPy tree from
    `checkpoints.converted.load_converted`, any float dtype): each leaf is placed shard by shard
    (`make_array_from_callback`, each host slices only its shards), cast to fp32 master weights.
    `model_config` names the model in errors; `sample_batch_shapes` ((pixel_values shape,
    input_ids shape)) defaults to one row of 8 tokens (init does not depend on it)."""
    rules = R.RULES if rules is None else rules
    shardings = train_state_shardings(module, optimizer, mesh, rules)
    if sample_batch_shapes is None:
        inputs = sample_inputs(module)
    else:
        inputs = tuple(jax.ShapeDtypeStruct(tuple(s), d) for s, d in zip(sample_batch_shapes, (jnp.float32, jnp.int32)))
    rng = key_data(rng)
    if params is None:

        def init(key):
            variables = module.init(jax.random.wrap_key_data(key), *(jnp.zeros(x.shape, x.dtype) for x in inputs))
            p = jax.tree.map(lambda x: x.astype(jnp.float32), nn.meta.unbox(variables["params"]))
            return TrainState.create(p, optimizer, key)

        return jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)(rng)

    name = as_config(model_config).variant if model_config is not None else "model"
    _check_params(params, abstract_params(module), f"params given for the {name} config")

    def place(x, sharding):
        x = x if isinstance(x, np.ndarray) else np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx], np.float32))

    placed = jax.tree.map(place, params, shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state, compiler_options=compiler_options)(placed)
    rep = shardings.step
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), rep),
        params=placed,
        opt_state=opt_state,
        rng=jax.device_put(rng, rep),
    )


def _microbatches(x: jax.Array, n: int, mesh: Mesh) -> jax.Array:
    """`[B, ...]` -> `[n, B/n, ...]`, microbatch i = rows i, i+n, ...: every device keeps its own rows
    (with B/devices divisible by n), so splitting moves no data."""
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} rows is not divisible by accumulate_steps={n}")
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, R.BATCH_AXES)))


def mesh_context_safe(boxed) -> bool:
    """Whether the models' own activation constraints (`nn.with_logical_constraint`) can be enabled.

    They need a global mesh while tracing. But flax re-runs every param's init abstractly during
    `apply` (a shape check), and `nn.DenseGeneral` unboxes its *flattened* kernel there, applying the
    box's logical constraint to a lower-rank array -> "with_sharding_constraint ... only valid for values
    of rank at least N". Boxes created with `nn.with_logical_partitioning(..., rules=())` skip that
    constraint (shardings come from `parallel.sharding` anyway); until every box is, we trace without
    a global mesh and rely on in/out shardings + our own constraints on the batch and the logits."""
    boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return all(getattr(b, "rules", None) == () for b in boxes if isinstance(b, nn.Partitioned))


class _Context:
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)` when the model allows it (see above)."""

    def __init__(self, mesh, rules, enabled: bool):
        self.mesh, self.rules, self.enabled = mesh, rules, enabled
        self._stack = []

    def __enter__(self):
        if self.enabled:
            for c in (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)):
                c.__enter__()
                self._stack.append(c)

    def __exit__(self, *exc):
        while self._stack:
            self._stack.pop().__exit__(*exc)


def forward_sums(
    module, params, batch, num_datasets: int = 1, mesh: Optional[Mesh] = None, supervised_tokens: Optional[int] = None
):
    """(summed loss, per-dataset metric sums) of one batch: what the train, eval and LoRA steps
    differentiate / add up. `mesh`: constrain the logits' sharding on it (None: leave it to XLA).
    With `supervised_tokens` K, the lm_head runs only at each row's first K
    supervised positions (the action tokens and EOS: K = action_dim x chunk + 1), not at all T + P:
    the same loss and metrics (every other target is -100), without the [B, T + P, V] logits, which
    dominate the step for small models (V = 32064) and cost ~1 GB per 32 rows at 7B. The number of
    supervised targets beyond K is returned as `dropped` (the loop refuses a step that drops any).

    A parallel-decoding model (`module.parallel`) runs `VLA.parallel_actions` on the prompt part of
    each row (labels == -100) and is scored on its K*A placeholders: cross-entropy against the action
    tokens, or with the continuous head L1 against `batch["action"]` `[B, K, A]`; rows whose labels
    are not K*A action tokens + EOS count as `dropped`."""
    if getattr(module, "parallel", False):
        return _parallel_sums(module, params, batch, num_datasets)
    labels = batch["labels"]
    index, targets, dropped = None, labels, None
    if supervised_tokens:
        index, targets, dropped = supervised_positions(labels, module.num_patches, supervised_tokens)
    logits = module.apply(
        {"params": params},
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("proprio"),
        logits_index=index,
    )
    if mesh is not None:
        spec = R.fit_spec(P(R.BATCH_AXES, None, "tensor"), logits.shape, dict(mesh.shape))
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))
    loss, sums = loss_and_sums(
        logits,
        targets,
        None if supervised_tokens else module.num_patches,
        dataset_index=batch.get("dataset_index"),
        num_datasets=num_datasets,
        tokenizer=_action_tokenizer(module),
    )
    if dropped is not None:
        sums = dict(sums, dropped=jnp.zeros((num_datasets,), jnp.float32).at[0].set(dropped.astype(jnp.float32)))
    return loss, sums


def _action_tokenizer(module):
    """The model's action tokens (modules without the attribute, e.g. test doubles: Llama's)."""
    return getattr(module, "action_tokenizer", None)


def _parallel_sums(module, params, batch, num_datasets):
    n = module.num_action_positions
    targets, prompt, bad = action_targets(batch["labels"], n)
    out = module.apply(
        {"params": params},
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"].astype(bool) & prompt,
        batch.get("proprio"),
        method=type(module).parallel_actions,
    )
    if module.action_head is None:
        loss, sums = loss_and_sums(
            out,
            targets,
            None,
            dataset_index=batch.get("dataset_index"),
            num_datasets=num_datasets,
            tokenizer=_action_tokenizer(module),
        )
    else:
        if "action" not in batch:
            raise ValueError("the continuous action head trains on batch['action'] [B, K, A]; the batch has none")
        action = batch["action"]
        if action.shape[1:] != (module.action_chunk, module.action_dim):
            raise ValueError(
                f"batch['action'] is {action.shape}; the model predicts [B, {module.action_chunk}, "
                f"{module.action_dim}] (data.future_action_window_size = action_chunk - 1)"
            )
        loss, sums = continuous_sums(
            out,
            action,
            dataset_index=batch.get("dataset_index"),
            num_datasets=num_datasets,
            tokenizer=_action_tokenizer(module),
        )
    dropped = jnp.zeros((num_datasets,), jnp.float32).at[0].set(bad.astype(jnp.float32))
    return loss, dict(sums, dropped=dropped)


def select_batch(batch: dict) -> dict:
    """The model inputs of a batch (BATCH_KEYS present), with an error naming any required one missing."""
    missing = [k for k in BATCH_KEYS[:4] if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; has {sorted(batch)}")
    return {k: batch[k] for k in BATCH_KEYS if k in batch}


def guarded_update(
    state: TrainState,
    grads,
    loss_sum,
    sums: dict,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable,
    expected_step=None,
):
    """Gradients of the summed loss -> mean over supervised tokens -> one optimizer update, unless the
    loss or gradient norm is not finite: then every leaf of the old state is kept (a select, so
    shardings are unchanged) and `finite` is False. -> (new state, metrics).

    `expected_step` (int32 scalar, optional; negative: no check): the update also applies only when
    `state.step` equals it. A loop that passes its own step count makes a skipped update sticky: every later step keeps
    the state too, so the loop can check `state.step` only now and then (no device sync per step)
    and still stop with the state of the last good step."""
    count = jnp.maximum(sums["tokens"].sum(), 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    apply = finite if expected_step is None else finite & ((expected_step < 0) | (state.step == expected_step))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new = state.replace(  # pyright: ignore[reportAttributeAccessIssue]  (flax.struct adds replace)
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    new = jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, state)
    metrics = summarize(sums)
    metrics.update(grad_norm=grad_norm, lr=jnp.asarray(lr_schedule(state.step), jnp.float32), finite=finite)
    return new, metrics


def make_train_step(
    module,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable,
    mesh: Mesh,
    rules=None,
    *,
    num_datasets: int = 1,
    accumulate_steps: int = 1,
    freeze: Sequence[str] = (),
    supervised_tokens: Optional[int] = None,
    state_shardings: Optional[TrainState] = None,
    donate: bool = True,
    compiler_options: Optional[dict] = None,
) -> Callable:
    """-> `step(state, batch) -> (state, metrics)`, jitted with in/out shardings, state donated.

    batch: global arrays (see `parallel.global_batch`): pixel_values `[B, S, S, 6]`, input_ids /
    attention_mask / labels `[B, T]`, optional dataset_index `[B]` int32 in [0, num_datasets).
    `freeze`: the optimizer's freeze regexes; frozen params get no gradient computed (stop_gradient),
    so grad_norm covers the trained params only. metrics (replicated scalars / `[num_datasets]`):
    loss, action_accuracy, l1, tokens, action_tokens, dataset_* (see `train.loss.summarize`),
    grad_norm (before clipping), lr (used for this update), finite. When the loss or the gradient
    norm is not finite the state comes back unchanged (params, opt_state, step) and finite=False.
    `compiler_options`: XLA options for this jit (e.g. `FAST_COMPILE` for CPU tests / demos)."""
    rules = R.RULES if rules is None else rules
    shardings = state_shardings or train_state_shardings(module, optimizer, mesh, rules)
    boxed = abstract_params(module)
    mask = trainable_mask(boxed, freeze) if freeze else None
    context = _Context(mesh, rules, mesh_context_safe(boxed))

    def loss_fn(params, batch):
        if mask is not None:
            params = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), params, mask)
        return forward_sums(module, params, batch, num_datasets, mesh, supervised_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def constrain_like_params(tree):
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings.params)

    def train_step(state: TrainState, batch: dict, expected_step):
        if accumulate_steps == 1:
            (loss_sum, sums), grads = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: _microbatches(x, accumulate_steps, mesh), batch)

            def body(carry, mb):
                g_acc, s_acc, l_acc = carry
                (loss, s), g = grad_fn(state.params, mb)
                g_acc = constrain_like_params(jax.tree.map(jnp.add, g_acc, g))
                return (g_acc, jax.tree.map(jnp.add, s_acc, s), l_acc + loss), None

            zeros = constrain_like_params(jax.tree.map(jnp.zeros_like, state.params))
            s0 = {
                k: jnp.zeros((num_datasets,), jnp.float32)
                for k in SUM_KEYS + (("dropped",) if supervised_tokens or getattr(module, "parallel", False) else ())
            }
            (grads, sums, loss_sum), _ = jax.lax.scan(body, (zeros, s0, jnp.zeros((), jnp.float32)), micro)
        return guarded_update(state, grads, loss_sum, sums, optimizer, lr_schedule, expected_step)

    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, NamedSharding(mesh, P(R.BATCH_AXES)), replicated(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
    )

    def step(state: TrainState, batch: dict, expected_step: Optional[int] = None):
        """`expected_step`: see `guarded_update` (the loop passes its step count; None: no check)."""
        expected = jnp.asarray(-1 if expected_step is None else expected_step, jnp.int32)
        with context:  # the models' nn.with_logical_constraint needs the rules and a mesh while tracing
            return jitted(state, select_batch(batch), expected)

    step.jitted = jitted
    step.shardings = shardings
    step.activation_constraints = context.enabled
    return step


def make_eval_step(
    module,
    mesh: Mesh,
    rules=None,
    *,
    num_datasets: int = 1,
    params_shardings=None,
    supervised_tokens: Optional[int] = None,
    compiler_options: Optional[dict] = None,
) -> Callable:
    """-> `eval_step(params, batch) -> sums` (per-dataset `[num_datasets]` sums of `train.loss`; add them
    over batches, then `train.loss.summarize`). No update, nothing donated."""
    rules = R.RULES if rules is None else rules
    boxed = abstract_params(module)
    p_sh = params_shardings or param_shardings(boxed, mesh, rules)
    context = _Context(mesh, rules, mesh_context_safe(boxed))
    jitted = jax.jit(
        lambda params, batch: forward_sums(module, params, batch, num_datasets, mesh, supervised_tokens)[1],
        in_shardings=(p_sh, NamedSharding(mesh, P(R.BATCH_AXES))),
        out_shardings=replicated(mesh),
        compiler_options=compiler_options,
    )

    def eval_step(params, batch: dict):
        with context:
            return jitted(params, select_batch(batch))

    eval_step.jitted = jitted
    return eval_step


# ----------------------------------------------------------------------------- ahead of time
def abstract_train_state(module, optimizer: optax.GradientTransformation, shardings: TrainState, optimizer_config=None):
    """The train state as `ShapeDtypeStruct`s carrying `shardings` (no arrays): what `init_train_state`
    would make, with the frozen leaves in `optimizer_config.frozen_dtype` as the loop stores them."""
    from openvla_jax.train.optimizer import cast_frozen

    def init():
        p = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), nn.meta.unbox(abstract_params(module)))
        if optimizer_config is not None:
            p = cast_frozen(p, optimizer_config)
        return TrainState.create(p, optimizer, jnp.zeros((2,), jnp.uint32))

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_batch(module, mesh: Mesh, rows: int, text_len: int, num_datasets: int = 1) -> dict:
    """A global batch of `rows` rows of `text_len` tokens as sharded `ShapeDtypeStruct`s, with the
    fields and dtypes the data pipeline gives (`data/rlds.py`) for this model's options."""
    pixels, _ = sample_inputs(module, rows, text_len)
    fields = dict(
        pixel_values=(pixels.shape, jnp.float32),
        input_ids=((rows, text_len), jnp.int32),
        attention_mask=((rows, text_len), jnp.bool_),
        labels=((rows, text_len), jnp.int32),
    )
    if num_datasets > 1:
        fields["dataset_index"] = ((rows,), jnp.int32)
    if getattr(module, "proprio_projector", None) is not None:
        fields["proprio"] = ((rows, module.proprio_projector.proprio_dim), jnp.float32)
    if getattr(module, "action_head", None) is not None:
        fields["action"] = ((rows, module.action_chunk, module.action_dim), jnp.float32)
    sharding = NamedSharding(mesh, P(R.BATCH_AXES))
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in fields.items()}


def lower_train_step(step: Callable, state, batch: dict, mesh: Mesh, rules=None):
    """`jax.stages.Lowered` of a `make_train_step` step for (abstract or real) `state` and `batch`,
    traced under the same mesh / logical-rules context as a call: `.compile()` it for any backend."""
    from openvla_jax.models.common import traced_for

    context = _Context(mesh, R.RULES if rules is None else rules, step.activation_constraints)
    expected = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    with context, traced_for(mesh):  # e.g. cuDNN attention for a GPU mesh, traced on a CPU host
        return step.jitted.lower(state, select_batch(batch), expected)
