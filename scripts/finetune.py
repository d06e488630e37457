"""Fine-tune a converted OpenVLA checkpoint on an RLDS dataset: LoRA (default) or full.

  python scripts/finetune.py --config=configs/finetune.py:lora --workdir=runs/lora \
      --config.init_from=checkpoints/openvla-7b-jax --config.data.data_dir=/data/rlds \
      --config.data.mixture=my_robot
  python scripts/finetune.py --config=configs/finetune.py:full --workdir=runs/full ...

LoRA writes to the work dir: adapters/ (`train.lora.save_adapters`, every `train.save_every` steps
and at the end), dataset_statistics.json (the new dataset's, for unnormalizing), metrics.jsonl and
export/ (the base with the adapters merged, a converted checkpoint: `OpenVLA.load` or
`scripts/convert.py to-hf export/ OUT`), and checkpoints/ (adapters + optimizer state + data position,
`checkpoints/training.py`): re-running with the same --workdir resumes. LoRA runs single-process on one
device; `:full` is `train/loop.py` (sharded, resumable).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

config_flags.DEFINE_config_file("config", None, "e.g. configs/finetune.py:lora", lock_config=False)
flags.DEFINE_string("workdir", None, "where adapters/, metrics.jsonl, dataset_statistics.json, export/ go")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def with_model_of_checkpoint(config):
    """config with `model` replaced by init_from's model config, keeping the configured compute dtype
    and remat policy (they do not change the params; the checkpoint's scan_layers does: kept as saved)."""
    import ml_collections

    from openvla_jax.checkpoints.converted import is_converted
    from openvla_jax.models.config import read_model_config

    if not config.init_from or not is_converted(config.init_from):
        raise FileNotFoundError(
            f"init_from={config.init_from!r} is not a converted checkpoint (model_config.json + "
            "params/): convert one with `scripts/convert.py to-jax`"
        )
    model = read_model_config(Path(config.init_from) / "model_config.json")
    model = model.replace(dtype=config.model.dtype, remat_policy=config.model.remat_policy)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = model.to_config_dict()
    return config


def finetune_lora(config, workdir) -> dict:
    """LoRA on a frozen base; resumes from `workdir/checkpoints` (adapters, their optimizer state, step,
    RNG and the data position, saved every `train.save_every` steps by `train.checkpoint`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from openvla_jax.checkpoints.converted import load_converted
    from openvla_jax.checkpoints.training import TrainCheckpointer
    from openvla_jax.data.iterator import CheckpointableIterator
    from openvla_jax.data.rlds import RLDSPipeline
    from openvla_jax.models import vla
    from openvla_jax.tokenizer.actions import ActionTokenizer
    from openvla_jax.tokenizer.text import TextTokenizer
    from openvla_jax.train import lora as L
    from openvla_jax.train.loop import (
        MetricsWriter,
        data_config,
        supervised_tokens,
        tokenizer_dir,
        trained_preprocessing,
    )
    from openvla_jax.train.optimizer import make_optimizer

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train
    ckpt = TrainCheckpointer(
        workdir, save_every=tc.save_every, keep_last=tc.keep_last, async_save=tc.async_save, checksum=tc.checksum
    )
    latest = ckpt.latest_step()
    # a resumed run normalises with the statistics it started with
    stats = ckpt.read_dataset_statistics() if latest is not None else None
    tok_dir = tokenizer_dir(config)
    pipeline = RLDSPipeline(
        data_config(config, train=True, dataset_statistics=stats),
        TextTokenizer(tok_dir),
        ActionTokenizer.for_model(config.model),
    )
    ckpt.write_config(config)
    ckpt.write_dataset_statistics(pipeline.statistics)
    data = CheckpointableIterator(pipeline)

    cfg = L.LoraConfig(**config.lora.to_dict())
    module = vla.from_config(config.model, dtype=config.model.dtype)
    _, params, _ = load_converted(config.init_from)
    base = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), config.base_dtype), params)
    del params
    optimizer, schedule = make_optimizer(config.optimizer, L.abstract_adapters(base, cfg))
    state = L.init_lora_state(base, cfg, optimizer, jax.random.key(config.seed))
    if latest is not None:
        state = _restore_lora(ckpt, latest, state, cfg, data)
    meta = dict(rng=np.asarray(jax.device_get(state.rng)).tolist(), lora=cfg.to_dict())
    n, total = L.count(state.params), L.count(base)
    print(
        f"finetune: LoRA r={cfg.rank} on {config.model.variant}: {n:,} trainable of {total:,} "
        f"({100 * n / total:.2f}%)" + (f"; resumed at step {latest}" if latest is not None else "")
    )
    step_fn = L.make_lora_train_step(module, optimizer, schedule, cfg, supervised_tokens=supervised_tokens(config))
    writer = MetricsWriter(workdir, [name for name, _ in pipeline.mixture], True)
    first = (latest or 0) + 1
    last, t0 = {}, time.perf_counter()
    try:
        for step in range(first, tc.steps + 1):
            state, metrics = step_fn(state, base, next(data))
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = jax.device_get(metrics)
                if not bool(metrics["finite"]):
                    raise FloatingPointError(f"step {step}: loss {float(metrics['loss'])} is not finite")
                last = writer.write(step, dict(metrics, step_time=(time.perf_counter() - t0) / (step - first + 1)))
            if ckpt.save(step, state.params, state.opt_state, meta, force=step == tc.steps, data_iterator=data):
                L.save_adapters(workdir / "adapters", jax.device_get(state.params), cfg)
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    summary = dict(step=tc.steps, adapters=str(workdir / "adapters"), trainable=n, **last)
    if config.export_merged:
        export = workdir / "export"
        if export.exists():
            import shutil

            shutil.rmtree(export)
        L.merge_and_export(
            config.init_from,
            jax.device_get(state.params),
            cfg,
            export,
            norm_stats=_jsonable(pipeline.statistics),
            model_config_updates=trained_preprocessing(config, pipeline),
        )
        summary["export"] = str(export)
    return summary


def _restore_lora(ckpt, step: int, state, cfg, data):
    """state (adapters, optimizer state, step, RNG) and the data position of checkpoint `step`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    saved = ckpt.restore_meta(step).get("lora")
    if saved != cfg.to_dict():
        raise ValueError(
            f"{ckpt.directory}/{step} was trained with LoRA {saved}, this run asks for {cfg.to_dict()}: "
            "use another --workdir or the same config.lora"
        )
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)  # noqa: E731
    adapters, opt_state, meta = ckpt.restore(
        step, abstract_params=like(state.params), abstract_opt_state=like(state.opt_state)
    )
    ckpt.restore_data_iterator(step, data)
    return state.replace(
        step=jnp.asarray(step, jnp.int32),
        params=adapters,
        opt_state=opt_state,
        rng=jnp.asarray(np.asarray(meta["rng"], np.uint32)),
    )


def _jsonable(x):
    import numpy as np

    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = with_model_of_checkpoint(FLAGS.config)
    if config.variant == "full":
        from openvla_jax.train.loop import train

        summary = train(config, FLAGS.workdir)
    else:
        summary = finetune_lora(config, FLAGS.workdir)
    keys = ("train/loss", "train/action_accuracy", "train/l1")
    print(
        f"finetune ({config.variant}): step {summary['step']} "
        + json.dumps({k: round(summary[k], 4) for k in keys if k in summary})
        + (f" export={summary['export']}" if "export" in summary else "")
    )
    return 0


if __name__ == "__main__":
    app.run(main)
