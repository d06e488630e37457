"""What the training loop trains: the whole model, or LoRA adapters on a frozen base.

`train/loop.py` runs one loop for pretraining, full fine-tuning and LoRA; what differs lives here,
behind one small interface (`make_trainable(config, module, mesh, rules)`):

  shardings           a TrainState of NamedSharding (params = what the optimizer trains)
  optimizer, schedule  the optax transformation over those params and its lr schedule
  step(state, batch, expected_step) -> (state, metrics)   jitted on the mesh, state donated
  init_state()        a fresh state, created sharded (full: `config.init_from` or random init;
                      LoRA: gaussian A, zero B, the parameters trained in full as init_from has them)
  abstract_params()   the params as ShapeDtypeStruct with shardings (restoring a checkpoint)
  meta()              what a checkpoint must record about the run (LoRA: its LoraConfig)
  model_params(state) the model's params (LoRA: merged into the base) for evaluation
  on_save(state)      side artefacts beside a checkpoint (LoRA: `adapters/`, `lora.save_adapters`)
  export(state, ...)  the converted checkpoint `OpenVLA.load` reads

`Full`: every parameter (minus `optimizer.freeze`) in fp32 master weights, sharded by the logical
rules + FSDP. `Lora`: the base comes from `config.init_from` (required), placed sharded by the same
rules in `config.base_dtype`, its linear kernels quantized when `config.base_quant` is "int8" or
"int4" (`quant/frozen.py`), a separate jit argument that is never donated, never seen by the
optimizer and never checkpointed; the adapters (+ their Adam state, + the parameters trained in full,
`lora.full`) are the TrainState's params, sharded by their kernels' logical input / output axes
(`lora.adapter_shardings`).

Starting from a checkpoint that lacks parts the config adds (`init_params`): an OpenVLA checkpoint
has no proprio projector or continuous action head (OpenVLA-OFT's). Those, and only those
(`NEW_PARTS`), are initialized as a fresh model's, and named in the log; any other missing
parameter, a shape that differs or a parameter the model does not have is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.models.config import as_config

log = logging.getLogger(__name__)

TrainConfig = Any  # ml_collections.ConfigDict from configs/train.py / configs/finetune.py (fields are dynamic)
NEW_PARTS = ("proprio_projector", "action_head")  # what OpenVLA-OFT adds to an OpenVLA model


def lora_config_of(config: TrainConfig):
    """`config.lora` as a `train.lora.LoraConfig`, or None (no `lora` field, or None: train every parameter)."""
    from openvla_jax.train.lora import LoraConfig

    section = config.get("lora", None)
    return None if section is None else LoraConfig.from_dict(section.to_dict())


def init_params(params, module, where: str, seed: int) -> tuple[dict, list[str]]:
    """Checkpoint params (NumPy tree) -> (every parameter of `module`, the paths initialized fresh).

    The checkpoint's parameters are taken as they are; parameters of `NEW_PARTS` it lacks are
    initialized fresh (their own initializers, key `seed`; nothing else of the model is computed)
    and listed in the log. A shape mismatch, a parameter the model does not have, or
    a missing one outside `NEW_PARTS` is an error naming them."""
    from openvla_jax.train.lora import flat_params, nest_params
    from openvla_jax.train.step import abstract_params

    want = {p: tuple(x.shape) for p, x in flat_params(abstract_params(module)).items()}
    got = flat_params(params)
    problems = [
        f"{p}: want shape {want[p]}, got {tuple(x.shape)}"
        for p, x in got.items()
        if p in want and tuple(x.shape) != want[p]
    ]
    problems += [f"unexpected {p} {tuple(x.shape)}" for p, x in got.items() if p not in want]
    missing = sorted(set(want) - set(got))
    problems += [f"{p}: want shape {want[p]}, missing" for p in missing if p.split("/")[0] not in NEW_PARTS]
    if problems:
        raise ValueError(
            f"{where} do not fit the model: "
            + "; ".join(problems[:10])
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        )
    if not missing:
        return params, []

    def new_parts(vla):  # runs the new parts alone: their init, not the whole model's forward pass
        if vla.proprio_projector is not None:
            vla.proprio_projector(jnp.zeros((1, vla.proprio_projector.proprio_dim), jnp.float32))
        if vla.action_head is not None:
            hidden = vla.language_model.config.hidden_size
            vla.action_head(jnp.zeros((1, vla.num_action_positions, hidden), vla.language_model.dtype))

    def init(key):
        fresh = flat_params(module.init(key, method=new_parts)["params"])
        return {p: fresh[p].astype(jnp.float32) for p in missing}

    fresh = jax.device_get(init(jax.random.key(seed)))  # a few small arrays: eager beats compiling
    log.warning(
        "%s lacks %d parameters this model adds; initialized fresh (seed %d): %s",
        where,
        len(missing),
        seed,
        ", ".join(f"{p} {want[p]}" for p in missing),
    )
    return nest_params({**got, **{p: np.asarray(v) for p, v in fresh.items()}}), missing


def make_trainable(config: TrainConfig, module, mesh, rules, *, num_datasets: int, supervised_tokens):
    cfg = lora_config_of(config)
    if cfg is None:
        return Full(config, module, mesh, rules, num_datasets=num_datasets, supervised_tokens=supervised_tokens)
    return Lora(config, module, mesh, rules, cfg, num_datasets=num_datasets, supervised_tokens=supervised_tokens)


def _shaped(tree, shardings, dtype=None):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), nn.meta.unbox(tree), shardings
    )


class Full:
    """Every parameter trained (pretraining, full fine-tuning)."""

    lora = None

    def __init__(self, config, module, mesh, rules, *, num_datasets, supervised_tokens):
        from openvla_jax.train.optimizer import make_optimizer
        from openvla_jax.train.step import abstract_params, make_train_step

        self.config, self.module, self.mesh, self.rules = config, module, mesh, rules
        self.boxed = abstract_params(module)
        self.optimizer, self.schedule = make_optimizer(config.optimizer, self.boxed)
        self._step = make_train_step(
            module,
            self.optimizer,
            self.schedule,
            mesh,
            rules,
            num_datasets=num_datasets,
            accumulate_steps=config.optimizer.accumulate_steps,
            freeze=config.optimizer.freeze,
            supervised_tokens=supervised_tokens,
        )
        self.shardings = self._step.shardings
        self.params_shardings = self.shardings.params

    def step(self, state, batch, expected_step=None):
        return self._step(state, batch, expected_step=expected_step)

    def init_state(self):
        from openvla_jax.train.step import init_train_state

        params = None
        if self.config.init_from:
            from openvla_jax.checkpoints.converted import load_converted

            _, params, _ = load_converted(self.config.init_from)
            params, _ = init_params(params, self.module, f"the params in {self.config.init_from}", self.config.seed)
        return init_train_state(
            self.module,
            self.config.model,
            self.optimizer,
            self.mesh,
            self.rules,
            jax.random.key(self.config.seed),
            params=params,
        )

    def prepare(self, state):
        """The state as the loop trains it: frozen params cast to `optimizer.frozen_dtype`."""
        from openvla_jax.train.optimizer import cast_frozen

        return state.replace(params=cast_frozen(state.params, self.config.optimizer))

    def abstract_params(self):
        return _shaped(self.boxed, self.shardings.params, jnp.float32)

    def meta(self) -> dict:
        return {}

    def model_params(self, state):
        return state.params

    def describe(self) -> str:
        return f"{as_config(self.config.model).variant}: every parameter"

    def on_save(self, state, workdir) -> None:
        pass

    def summary(self, workdir) -> dict:
        return {}

    def export(self, state, ckpt, out_dir, model_config, statistics, tok_dir) -> Path:
        return ckpt.export_for_inference(None, out_dir, model_config, statistics, tok_dir, params=state.params)


class Lora:
    """LoRA adapters trained on a frozen base (`train/lora.py`), float or quantized (`base_quant`).
    `load=False`: no base is read (the compile check: `abstract_inputs`, `lower`)."""

    def __init__(
        self,
        config,
        module,
        mesh,
        rules,
        cfg,
        *,
        num_datasets,
        supervised_tokens,
        load: bool = True,
        compiler_options: Optional[dict] = None,
    ):
        from openvla_jax.parallel.sharding import param_shardings
        from openvla_jax.quant.frozen import BASE_QUANT
        from openvla_jax.quant.weights import DEFAULT_GROUP_SIZE
        from openvla_jax.train import lora as L
        from openvla_jax.train.optimizer import make_optimizer
        from openvla_jax.train.step import abstract_params

        if load and not config.init_from:
            raise ValueError("LoRA trains adapters on a base model: set config.init_from to a converted checkpoint")
        if config.optimizer.accumulate_steps != 1:
            raise ValueError(f"optimizer.accumulate_steps={config.optimizer.accumulate_steps}: LoRA steps take 1")
        self.quant = config.get("base_quant", "none") or "none"
        if self.quant not in BASE_QUANT:
            raise ValueError(f"base_quant={self.quant!r}: expected one of {BASE_QUANT}")
        self.group_size = config.get("base_group_size", DEFAULT_GROUP_SIZE)
        self.dtype = jnp.dtype(config.get("base_dtype", "float32"))
        self.config, self.module, self.mesh, self.rules, self.lora = config, module, mesh, rules, cfg
        self.boxed = abstract_params(module)
        self.optimizer, self.schedule = make_optimizer(config.optimizer, L.abstract_adapters(self.boxed, cfg))
        self.base_shardings = L.frozen_base_shardings(self.boxed, cfg, mesh, rules, self.quant, self.group_size)
        self._step = L.make_lora_train_step(
            module,
            self.optimizer,
            self.schedule,
            cfg,
            mesh=mesh,
            rules=rules,
            num_datasets=num_datasets,
            supervised_tokens=supervised_tokens,
            base_shardings=self.base_shardings,
            compiler_options=compiler_options,
        )
        self.shardings = self._step.shardings
        self.params_shardings = param_shardings(self.boxed, mesh, rules)  # the merged model (evaluation)
        self.base, self._full_values = None, {}
        if load:
            self._load_base()
        shapes = nn.meta.unbox(self.boxed)

        def merged(base, adapters):
            if self.quant != "none":
                from openvla_jax.quant.frozen import dequantize_frozen

                base = dequantize_frozen(base, self.dtype, shapes)
            return L.merge(base, adapters, cfg)

        self._merge = jax.jit(merged, out_shardings=self.params_shardings)

    def _load_base(self):
        """The frozen base: init_from's params (+ fresh ones for the parts the config adds, which must be
        trained in full), placed shard by shard (each host reads only its shards), in base_dtype or
        quantized; the initial values of the parameters trained in full kept for `init_state`."""
        from openvla_jax.checkpoints.converted import load_converted
        from openvla_jax.train import lora as L

        where = f"the base in {self.config.init_from}"
        _, params, _ = load_converted(self.config.init_from)
        params, added = init_params(params, self.module, where, self.config.seed)
        full = L.full_targets(self.boxed, self.lora)
        frozen_new = [p for p in added if p not in full]
        if frozen_new:
            raise ValueError(
                f"{where} lacks {frozen_new[:3]}: a new part cannot stay frozen at its random init; train "
                f"it in full with config.lora.full (e.g. '({'|'.join(NEW_PARTS)})/.*')"
            )
        flat = L.flat_params(params)
        self._full_values = {p: np.asarray(flat[p], np.float32) for p in full}
        host = L.frozen_base(params, self.lora, self.dtype, self.quant, self.group_size)
        del params, flat

        def place(x, sharding):
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx]))

        self.base = jax.tree.map(place, host, self.base_shardings)

    def step(self, state, batch, expected_step=None):
        return self._step(state, self.base, batch, expected_step=expected_step)

    def init_state(self):
        from openvla_jax.train import lora as L

        return L.init_lora_state(
            self.boxed,
            self.lora,
            self.optimizer,
            jax.random.key(self.config.seed),
            shardings=self.shardings,
            full_values=self._full_values,
        )

    def prepare(self, state):
        return state

    def abstract_params(self):
        from openvla_jax.train import lora as L

        return _shaped(L.abstract_adapters(self.boxed, self.lora), self.shardings.params)

    def abstract_inputs(self):
        """(the train state, the frozen base) as sharded ShapeDtypeStructs: what `lower` compiles for."""
        from openvla_jax.train import lora as L
        from openvla_jax.train.state import TrainState

        params = self.abstract_params()
        opt = jax.eval_shape(self.optimizer.init, params)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.shardings.step),
            params=params,
            opt_state=jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, self.shardings.opt_state
            ),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.shardings.rng),
        )
        base = L.abstract_base(self.boxed, self.lora, self.dtype, self.quant, self.group_size)
        return state, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base, self.base_shardings
        )

    def lower(self, state, base, batch):
        return self._step.lower(state, base, batch)

    def meta(self) -> dict:
        lora = self.lora.to_dict()
        if not lora["full"]:  # as checkpoints written before `full` existed record it: they still resume
            del lora["full"]
        return {"lora": lora, "base_quant": self.quant}

    def model_params(self, state):
        """The merged model for evaluation (a merged copy on the device; training never merges)."""
        return self._merge(self.base, state.params)

    def describe(self) -> str:
        n, total = self.counts()
        return (
            f"LoRA r={self.lora.rank} on {as_config(self.config.model).variant}"
            + (f" ({self.quant} base)" if self.quant != "none" else "")
            + f": {n:,} trainable of {total:,} ({100 * n / total:.2f}%)"
        )

    def counts(self) -> tuple[int, int]:
        from openvla_jax.train import lora as L

        return L.count(L.abstract_adapters(self.boxed, self.lora)), L.count(nn.meta.unbox(self.boxed))

    def on_save(self, state, workdir) -> None:
        """`workdir/adapters` (the adapters alone, `lora.save_adapters`) beside every checkpoint."""
        from openvla_jax.checkpoints.training import params_to_numpy
        from openvla_jax.train import lora as L

        adapters = params_to_numpy(state.params)  # every process joins a multi-host gather
        if jax.process_index() == 0:
            L.save_adapters(Path(workdir) / "adapters", adapters, self.lora)

    def summary(self, workdir) -> dict:
        n, total = self.counts()
        return dict(adapters=str(Path(workdir) / "adapters"), trainable=n, total=total, lora_rank=self.lora.rank)

    def export(self, state, ckpt, out_dir, model_config, statistics, tok_dir) -> Path:
        """The base with the adapters merged (on the host, one kernel at a time, never a merged copy on
        the device) as a converted checkpoint: the base's dtype, tokenizer and hf_config, the
        fine-tuning data's statistics and preprocessing, this model's action options (new heads trained
        in full are added). A quantized run merges into init_from's full-precision weights (as PEFT's
        QLoRA is deployed: the adapters on the original base)."""
        import dataclasses

        from openvla_jax.checkpoints.training import _jsonable, params_to_numpy
        from openvla_jax.train import lora as L

        model_config = as_config(model_config)
        updates = dict(
            dataclasses.asdict(model_config.actions),
            image_resize=model_config.image_resize,
            center_crop=model_config.center_crop,
        )
        return L.merge_and_export(
            self.config.init_from,
            params_to_numpy(state.params),
            self.lora,
            out_dir,
            norm_stats=_jsonable(statistics),
            model_config_updates=updates,
        )
