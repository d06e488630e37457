"""What the training loop trains: the whole model, or LoRA adapters on a frozen base.

`train/loop.py` runs one loop for pretraining, full fine-tuning and LoRA; what differs lives here,
behind one small interface (`make_trainable(config, module, mesh, rules)`):

  shardings           a TrainState of NamedSharding (params = what the optimizer trains)
  optimizer, schedule  the optax transformation over those params and its lr schedule
  step(state, batch, expected_step) -> (state, metrics)   jitted on the mesh, state donated
  init_state()        a fresh state, created sharded (full: `config.init_from` or random init;
                      LoRA: gaussian A, zero B)
  abstract_params()   the params as ShapeDtypeStruct with shardings (restoring a checkpoint)
  meta()              what a checkpoint must record about the run (LoRA: its LoraConfig)
  model_params(state) the model's params (LoRA: merged into the base) for evaluation
  on_save(state)      side artefacts beside a checkpoint (LoRA: `adapters/`, `lora.save_adapters`)
  export(state, ...)  the converted checkpoint `OpenVLA.load` reads

`Full`: every parameter (minus `optimizer.freeze`) in fp32 master weights, sharded by the logical
rules + FSDP. `Lora`: the base comes from `config.init_from` (required), placed sharded by the same
rules in `config.base_dtype`, a separate jit argument that is never donated, never seen by the
optimizer and never checkpointed; the adapters (+ their Adam state) are the TrainState's params,
sharded by their kernels' logical input / output axes (`lora.adapter_shardings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openvla_jax.models.config import as_config

TrainConfig = Any  # ml_collections.ConfigDict from configs/train.py / configs/finetune.py (fields are dynamic)


def lora_config_of(config: TrainConfig):
    """`config.lora` as a `train.lora.LoraConfig`, or None (no `lora` field, or None: train every parameter)."""
    from openvla_jax.train.lora import LoraConfig

    section = config.get("lora", None)
    return None if section is None else LoraConfig(**section.to_dict())


def make_trainable(config: TrainConfig, module, mesh, rules, *, num_datasets: int, supervised_tokens):
    cfg = lora_config_of(config)
    kwargs = dict(num_datasets=num_datasets, supervised_tokens=supervised_tokens)
    if cfg is None:
        return Full(config, module, mesh, rules, **kwargs)
    return Lora(config, module, mesh, rules, cfg, **kwargs)


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
    """LoRA adapters trained on a frozen base (`train/lora.py`)."""

    def __init__(self, config, module, mesh, rules, cfg, *, num_datasets, supervised_tokens):
        from openvla_jax.checkpoints.converted import load_converted
        from openvla_jax.parallel.sharding import param_shardings
        from openvla_jax.train import lora as L
        from openvla_jax.train.optimizer import make_optimizer
        from openvla_jax.train.step import _check_params, abstract_params

        if not config.init_from:
            raise ValueError("LoRA trains adapters on a base model: set config.init_from to a converted checkpoint")
        if config.optimizer.accumulate_steps != 1:
            raise ValueError(f"optimizer.accumulate_steps={config.optimizer.accumulate_steps}: LoRA steps take 1")
        self.config, self.module, self.mesh, self.rules, self.lora = config, module, mesh, rules, cfg
        self.boxed = abstract_params(module)
        self.optimizer, self.schedule = make_optimizer(config.optimizer, L.abstract_adapters(self.boxed, cfg))
        self.base_shardings = param_shardings(self.boxed, mesh, rules)
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
        )
        self.shardings = self._step.shardings
        self.params_shardings = self.base_shardings

        # the frozen base: placed shard by shard (each host reads only its shards), in base_dtype
        _, params, _ = load_converted(config.init_from)
        _check_params(params, self.boxed, f"the base in {config.init_from}")
        dtype = np.dtype(jnp.dtype(config.get("base_dtype", "float32")))

        def place(x, sharding):
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx], dtype))

        self.base = jax.tree.map(place, params, self.base_shardings)
        del params
        self._merge = jax.jit(
            lambda base, adapters: L.merge(base, adapters, cfg),
            in_shardings=(self.base_shardings, self.shardings.params),
            out_shardings=self.base_shardings,
        )

    def step(self, state, batch, expected_step=None):
        return self._step(state, self.base, batch, expected_step=expected_step)

    def init_state(self):
        from openvla_jax.train import lora as L

        return L.init_lora_state(
            self.boxed, self.lora, self.optimizer, jax.random.key(self.config.seed), shardings=self.shardings
        )

    def prepare(self, state):
        return state

    def abstract_params(self):
        from openvla_jax.train import lora as L

        return _shaped(L.abstract_adapters(self.boxed, self.lora), self.shardings.params)

    def meta(self) -> dict:
        return {"lora": self.lora.to_dict()}

    def model_params(self, state):
        return self._merge(self.base, state.params)

    def describe(self) -> str:
        n, total = self.counts()
        return (
            f"LoRA r={self.lora.rank} on {as_config(self.config.model).variant}: {n:,} trainable of {total:,} "
            f"({100 * n / total:.2f}%)"
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
        fine-tuning data's statistics and preprocessing."""
        from openvla_jax.checkpoints.training import _jsonable, params_to_numpy
        from openvla_jax.train import lora as L

        model_config = as_config(model_config)
        updates = dict(image_resize=model_config.image_resize, center_crop=model_config.center_crop)
        return L.merge_and_export(
            self.config.init_from,
            params_to_numpy(state.params),
            self.lora,
            out_dir,
            norm_stats=_jsonable(statistics),
            model_config_updates=updates,
        )
