"""Train (or resume) an OpenVLA policy.

  python scripts/train.py --config=configs/train.py:demo --workdir=runs/demo
  python scripts/train.py --config=configs/train.py:openvla_7b_finetune --workdir=runs/ft \
      --config.init_from=checkpoints/openvla-7b-jax --config.data.data_dir=/data/rlds \
      --config.data.mixture=my_robot

Re-running the same command resumes from the work dir's latest complete checkpoint. SIGTERM saves
and exits cleanly. Multi-process: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.

A run that cannot go on (a diverged step, a failed checkpoint save, a work dir in use or with only
incomplete checkpoints) ends with its cause as the last line on stderr and exit code 3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/train.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl, tb/ and export/ go")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    from openvla_jax.train.loop import train
    from openvla_jax.utils.fatal import exit_with_cause, fatal_errors

    logging.set_verbosity(logging.WARNING)
    try:
        summary = train(FLAGS.config, FLAGS.workdir)
    except fatal_errors() as e:
        return exit_with_cause("train.py", e)
    if jax.process_index() == 0:
        keys = ("train/loss", "train/action_accuracy", "train/l1", "eval/loss", "eval/action_accuracy", "eval/l1")
        short = {k: round(summary[k], 4) for k in keys if k in summary}
        print(
            f"train: {summary['stopped_by']} at step {summary['step']} "
            + json.dumps(short)
            + (f" export={summary['export']}" if "export" in summary else "")
        )
        if summary.get("skipped_episodes"):
            print(f"train: episodes skipped by the data pipeline: {json.dumps(summary['skipped_episodes'])}")
    return 0


if __name__ == "__main__":
    app.run(main)
