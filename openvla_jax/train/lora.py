"""LoRA: low-rank adapters as a separate params tree, merged into the base functionally.

    adapters = init_lora(base, LoraConfig(), rng)           # {path: {"A": [.., in, r], "B": [.., r, out]}}
    logits = module.apply({"params": merge(base, adapters, cfg)}, ...)

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

  W' = W + (alpha / r) * (A @ B).reshape(W.shape)        computed in fp32, cast to W's dtype

Merging every step materialises one merged copy of each adapted kernel (and its full-size gradient,
then projected onto A and B); simple and exact, but it costs the memory of a merged copy of the
linear weights on top of the base, which an unmerged `x W + s x A B` inside the model would not.
Dropout > 0 cannot be expressed as a weight merge and is refused (the original recipe uses 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from openvla_jax.models import kernels
from openvla_jax.train.optimizer import param_paths
from openvla_jax.train.state import TrainState, key_data
from openvla_jax.train.step import forward_sums, guarded_update, select_batch

ADAPTERS_FILE = "adapters.npz"
CONFIG_FILE = "lora_config.json"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`target` / `exclude`: regexes `re.fullmatch`ed against '/'-joined param paths; a kernel is
    adapted when it matches `target` and not `exclude`. Defaults: every linear kernel but lm_head (and
    the conv patch embeddings)."""

    rank: int = 32
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r".*/kernel"
    exclude: str = r".*(lm_head|patch_embed)/kernel"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.dropout != 0.0:
            raise ValueError(
                f"LoRA dropout {self.dropout} is not supported (adapters are merged into the "
                "weights; dropout on the adapter input has no merged form); use 0.0 as the original"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split(path: str, shape) -> tuple[int, int, int]:
    """-> (stack dims 0/1, number of input dims, number of output dims) of a kernel (`models.kernels`)."""
    try:
        layout = kernels.kernel_layout(path.split("/"), shape)
    except ValueError as e:
        raise ValueError(f"LoRA target {e}; narrow LoraConfig.target") from None
    return layout.stack, layout.n_in, layout.n_out


def targets(params, cfg: LoraConfig) -> dict:
    """'/'-joined path -> kernel shape, for every adapted kernel (params boxed or not, arrays or shapes)."""
    params = nn.meta.unbox(params)
    target, exclude = re.compile(cfg.target), re.compile(cfg.exclude) if cfg.exclude else None
    out = {
        p: tuple(x.shape)
        for p, x in zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params))
        if target.fullmatch(p) and not (exclude and exclude.fullmatch(p))
    }
    if not out:
        raise ValueError(
            f"LoRA target {cfg.target!r} (exclude {cfg.exclude!r}) matches no parameter; paths look "
            f"like {jax.tree.leaves(param_paths(params))[:3]}"
        )
    return out


def adapter_shapes(path: str, shape, rank: int) -> tuple[tuple, tuple]:
    """-> (A shape `[stack.., prod(in), r]`, B shape `[stack.., r, prod(out)]`)."""
    stack, n_in, _ = _split(path, shape)
    lead, body = tuple(shape[:stack]), tuple(shape[stack:])
    return lead + (math.prod(body[:n_in]), rank), lead + (rank, math.prod(body[n_in:]))


def init_lora(params, cfg: LoraConfig, rng) -> dict:
    """-> adapters `{path: {"A": ..., "B": ...}}` (fp32): A ~ N(0, (1/r)^2) (PEFT "gaussian"), B = 0.
    `params` only supplies shapes (works under `jax.eval_shape`)."""
    out = {}
    for i, (path, shape) in enumerate(sorted(targets(params, cfg).items())):
        a_shape, b_shape = adapter_shapes(path, shape, cfg.rank)
        a = jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32) / cfg.rank
        out[path] = {"A": a, "B": jnp.zeros(b_shape, jnp.float32)}
    return out


def abstract_adapters(params, cfg: LoraConfig) -> dict:
    """The adapters' tree as ShapeDtypeStruct (no memory), e.g. for `train.optimizer.make_optimizer`."""
    return jax.eval_shape(lambda key: init_lora(params, cfg, key), jax.random.key(0))


def delta(shape, a, b, scale: float, xp=jnp):
    """(alpha/r) * A @ B reshaped to the kernel's `shape` (fp32), in the array module `xp` (jnp: traced,
    on device; np: on the host). A stack axis (if any) is a batch axis of the matmul and leads the
    reshape alike."""
    a, b = xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)
    ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) if xp is jnp else np.matmul(a, b)
    return (scale * ab).reshape(shape)


def merge(params, adapters: dict, cfg: LoraConfig, xp=jnp):
    """-> params with every adapted kernel W replaced by W + (alpha/r) A @ B (W's dtype); untargeted
    leaves are returned as they are (the same objects). `xp=jnp`: pure and jittable (the training step);
    `xp=np`: on the host, one kernel at a time, nothing on the device (exporting a 7B model)."""
    paths = param_paths(params)
    known = set(jax.tree.leaves(paths))
    missing = [p for p in adapters if p not in known]
    if missing:
        raise ValueError(f"adapters for parameters the model does not have: {missing[:3]}")

    def one(path, w):
        ad = adapters.get(path)
        if ad is None:
            return w
        w = xp.asarray(w)
        return (w.astype(xp.float32) + delta(w.shape, ad["A"], ad["B"], cfg.scale, xp)).astype(w.dtype)

    return jax.tree.map(one, paths, params)


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
def adapter_shardings(boxed_params, cfg: LoraConfig, mesh, rules=None) -> dict:
    """-> `{path: {"A": NamedSharding, "B": NamedSharding}}`: each adapter sharded by the logical axis
    rules + FSDP (`parallel.sharding.spec_for`) as its kernel is: A `[stack.., in, r]` takes the
    kernel's first input axis name, B `[stack.., r, out]` its first output axis name (`models.kernels`
    says which are which), a stack axis stays `layers`, the rank axis has none. `boxed_params`: the
    base's boxed abstract params (`train.step.abstract_params`); unboxed ones give replicated + FSDP."""
    from jax.sharding import NamedSharding

    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.sharding import spec_for

    rules = R.RULES if rules is None else rules
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves = jax.tree.leaves(boxed_params, is_leaf=is_box)
    paths = jax.tree.leaves(param_paths(boxed_params))
    names = {p: (x.names if is_box(x) else None) for p, x in zip(paths, leaves)}
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
    return out


def lora_state_shardings(boxed_params, cfg: LoraConfig, optimizer: optax.GradientTransformation, mesh, rules=None):
    """A TrainState of NamedSharding for an adapters-only state: adapters by `adapter_shardings`, their
    optimizer state mirrors them, step and RNG replicated."""
    from openvla_jax.parallel.sharding import opt_state_shardings, replicated

    a_sh = adapter_shardings(boxed_params, cfg, mesh, rules)
    o_sh = opt_state_shardings(optimizer, abstract_adapters(boxed_params, cfg), a_sh, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, params=a_sh, opt_state=o_sh, rng=rep)


def init_lora_state(
    base_params, cfg: LoraConfig, optimizer: optax.GradientTransformation, rng, shardings: Optional[TrainState] = None
) -> TrainState:
    """A TrainState whose params are the adapters only (the optimizer state covers them alone).
    `base_params` supplies shapes only (arrays, ShapeDtypeStruct, boxed or not). With `shardings`
    (`lora_state_shardings`) the state is created already sharded, with the same values."""
    rng = key_data(rng)
    if shardings is None:
        adapters = init_lora(base_params, cfg, jax.random.wrap_key_data(rng))
        return TrainState.create(adapters, optimizer, rng)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(base_params))

    def init(key):
        return TrainState.create(init_lora(shapes, cfg, jax.random.wrap_key_data(key)), optimizer, key)

    return jax.jit(init, out_shardings=shardings)(rng)


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
    any float dtype). batch: pixel_values `[B, S, S, 6]`, input_ids / attention_mask / labels `[B, T]`,
    optional dataset_index `[B]`. metrics: loss, action_accuracy, l1, tokens, ... (`train.loss.summarize`),
    grad_norm (of the adapter gradients), lr, finite. A non-finite loss or gradient leaves the state
    unchanged; `expected_step` makes that sticky (`train.step.guarded_update`).
    `mesh` (with the logical `rules`): jitted with in/out shardings on it like `train.step.make_train_step`:
    the state by `lora_state_shardings` (or `state_shardings`), the base by the rules + FSDP (or
    `base_shardings`), the batch over ("data", "fsdp"). Without a mesh: one device, shardings left to jit."""
    from contextlib import nullcontext

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from openvla_jax.parallel import rules as R
    from openvla_jax.parallel.sharding import param_shardings, replicated
    from openvla_jax.train.step import _Context, abstract_params, mesh_context_safe

    def loss_fn(adapters, base, batch):
        return forward_sums(module, merge(base, adapters, cfg), batch, num_datasets, mesh, supervised_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, base, batch, expected_step):
        base = jax.lax.stop_gradient(base)
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
        base_shardings = base_shardings or param_shardings(boxed, mesh, rules)
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

    step.jitted = jitted
    step.shardings = shardings
    step.base_shardings = base_shardings
    return step


# ------------------------------------------------------------------------------------ save / export
def save_adapters(path, adapters: dict, cfg: LoraConfig) -> Path:
    """Adapters alone (a few MB at 7B x rank 32 in fp32: ~440 MB; the base is not copied):
    `path/adapters.npz` ('<param path>/A', '<param path>/B') + `path/lora_config.json`."""
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
    cfg = LoraConfig(**json.loads((path / CONFIG_FILE).read_text()))
    adapters: dict = {}
    with np.load(path / ADAPTERS_FILE) as z:
        for key in z.files:
            p, k = key.rsplit("/", 1)
            adapters.setdefault(p, {})[k] = z[key]
    bad = [p for p, ad in adapters.items() if set(ad) != {"A", "B"}]
    if bad:
        raise ValueError(f"{path}: adapters {bad[:3]} lack A or B")
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
    image preprocessing the fine-tuning data had), which `OpenVLA.load` reads and
    `scripts/convert.py to-hf` turns into PyTorch. Merged on the host in NumPy, one kernel at a time."""
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
