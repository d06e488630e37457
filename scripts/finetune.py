"""Fine-tune a converted OpenVLA checkpoint on an RLDS dataset: LoRA (default) or full.

  python scripts/finetune.py --config=configs/finetune.py:lora --workdir=runs/lora \
      --config.init_from=checkpoints/openvla-7b-jax --config.data.data_dir=/data/rlds \
      --config.data.mixture=my_robot
  python scripts/finetune.py --config=configs/finetune.py:full --workdir=runs/full ...

Both run `train/loop.py` (sharded on `config.mesh`, resumable: re-running with the same --workdir
resumes; SIGTERM saves and exits). The work dir gets checkpoints/ (LoRA: adapters + their optimizer
state + data position; the frozen base is not copied), dataset_statistics.json (the new dataset's,
for unnormalizing), metrics.jsonl and export/ (a converted checkpoint: `OpenVLA.load` or
`scripts/convert.py to-hf export/ OUT`; LoRA: the base with the adapters merged). LoRA also writes
adapters/ (`train.lora.save_adapters`) at every checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

config_flags.DEFINE_config_file("config", None, "e.g. configs/finetune.py:lora", lock_config=False)
flags.DEFINE_string(
    "workdir", None, "where checkpoints/, adapters/, metrics.jsonl, dataset_statistics.json, export/ go"
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def with_model_of_checkpoint(config):
    """config with `model` replaced by init_from's model config, keeping the configured compute dtype
    and remat policy (they do not change the params; the checkpoint's scan_layers does: kept as saved)
    and the OpenVLA-OFT options the config sets (chunks, cameras, proprio, head)."""
    import ml_collections

    from openvla_jax.checkpoints.converted import is_converted
    from openvla_jax.models.config import as_config, read_model_config

    if not config.init_from or not is_converted(config.init_from):
        raise FileNotFoundError(
            f"init_from={config.init_from!r} is not a converted checkpoint (model_config.json + "
            "params/): convert one with `scripts/convert.py to-jax`"
        )
    model = read_model_config(Path(config.init_from) / "model_config.json")
    # the OFT options the config asks for (configs/finetune.py:oft_lora) on an OpenVLA checkpoint: the
    # new parts are initialized by the trainer; a config without any keeps the checkpoint's own
    wanted = as_config(config.model).actions.differences_from_openvla()
    model = model.replace(dtype=config.model.dtype, remat_policy=config.model.remat_policy, **wanted)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = model.to_config_dict()
    return config


def main(argv):
    del argv
    import jax

    from openvla_jax.train.loop import train
    from openvla_jax.utils.fatal import exit_with_cause, fatal_errors

    logging.set_verbosity(logging.WARNING)
    config = with_model_of_checkpoint(FLAGS.config)
    try:
        summary = train(config, FLAGS.workdir)
    except fatal_errors() as e:
        return exit_with_cause("finetune.py", e)
    if jax.process_index() != 0:
        return 0
    if "trainable" in summary:
        n, total = summary["trainable"], summary["total"]
        print(
            f"finetune: LoRA r={summary['lora_rank']}: {n:,} trainable of {total:,} ({100 * n / total:.2f}%)"
            + (f"; resumed at step {summary['resumed_from']}" if summary.get("resumed_from") is not None else "")
        )
    keys = ("train/loss", "train/action_accuracy", "train/l1")
    print(
        f"finetune ({config.variant}): step {summary['step']} "
        + json.dumps({k: round(summary[k], 4) for k in keys if k in summary})
        + (f" export={summary['export']}" if "export" in summary else "")
    )
    return 0


if __name__ == "__main__":
    app.run(main)
