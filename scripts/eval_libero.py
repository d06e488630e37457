"""Evaluate an OpenVLA checkpoint on LIBERO with the original protocol, N environments at a time.

  MUJOCO_GL=egl python scripts/eval_libero.py --checkpoint ckpt/openvla-7b-finetuned-libero-spatial \
      --suite libero_spatial --workers 8 --out runs/libero/spatial

  # OFT-style models (wrist image, 8-d proprio, action chunks) are recognised from the checkpoint;
  # --execute 8 runs the first 8 actions of each chunk open loop.
  # A chance baseline, no model: --policy random

Writes {out}/episodes.jsonl (one line per episode, as it ends), {out}/summary.json (per-task and
per-suite success with 95% intervals), {out}/success.png, and with --record one GIF per episode
under {out}/videos. Rerunning the same command resumes: finished episodes are skipped.
Needs the `libero` extra: `make install-libero`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Keep module-level imports light: spawned environment workers re-import this file, and must never
# import TensorFlow (it and Mesa's renderer segfault in one process).
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")

flags.DEFINE_string("checkpoint", None, "converted (scripts/convert.py to-jax) or HF OpenVLA directory")
flags.DEFINE_enum("policy", "model", ["model", "random"], "'random': uniform random actions, no checkpoint")
flags.DEFINE_enum("suite", "libero_spatial", SUITES, "task suite")
flags.DEFINE_list("tasks", None, "task ids to run (default: all of the suite)")
flags.DEFINE_integer("trials", 50, "episodes per task, from the suite's first initial states")
flags.DEFINE_integer("workers", 4, "environment processes stepped in lockstep (one policy call per step)")
flags.DEFINE_string("out", None, "output directory (default: runs/libero/{suite})")
flags.DEFINE_bool("center_crop", True, "center crop (area 0.9) for models trained with random crops")
flags.DEFINE_string("unnorm_key", None, "action statistics (default: the suite's, or <suite>_no_noops)")
flags.DEFINE_integer("execute", None, "actions of each predicted chunk executed open loop (default: all)")
flags.DEFINE_integer("max_steps", None, "policy steps per episode (default: the protocol's, per suite)")
flags.DEFINE_integer("num_steps_wait", 10, "no-op steps at the start of an episode while objects settle")
flags.DEFINE_bool("record", False, "write one GIF per episode under {out}/videos")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_enum("quantize", None, ["int8", "int4"], "weight-only quantization on load")
flags.DEFINE_integer("seed", 0, "seed of the random policy")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from openvla_jax.envs import libero

    settings = {"policy": FLAGS.policy}
    if FLAGS.policy == "random":
        policy = libero.random_policy(FLAGS.seed)
        settings["seed"] = FLAGS.seed
    else:
        if not FLAGS.checkpoint:
            raise app.UsageError("--checkpoint is required (or --policy random)")
        vla = libero.load_model(FLAGS.checkpoint, FLAGS.center_crop, dtype=FLAGS.dtype, quantize=FLAGS.quantize)
        policy = libero.openvla_policy(vla, FLAGS.suite, FLAGS.unnorm_key)
        settings.update(
            checkpoint=str(Path(FLAGS.checkpoint).resolve()), center_crop=vla.center_crop,
            unnorm_key=policy.unnorm_key, dtype=FLAGS.dtype, quantize=FLAGS.quantize,
        )  # fmt: skip
    out = FLAGS.out or f"runs/libero/{FLAGS.suite}"
    summary = libero.evaluate_libero(
        policy,
        FLAGS.suite,
        out,
        tasks=FLAGS.tasks,
        trials=FLAGS.trials,
        workers=FLAGS.workers,
        max_steps=FLAGS.max_steps,
        num_steps_wait=FLAGS.num_steps_wait,
        execute=FLAGS.execute,
        record=FLAGS.record,
        settings=settings,
        progress=True,
    )
    s = summary["suites"].get(FLAGS.suite, summary["overall"])
    lo, hi = s["ci95"]
    run = summary["this_run"]
    print(
        json.dumps(
            {
                "suite": FLAGS.suite,
                "success_rate": round(s["success_rate"], 4),
                "ci95": [round(lo, 4), round(hi, 4)],
                "episodes": s["episodes"],
                "this_run_episodes": run["episodes"],
                "env_steps_per_second": round(run["env_steps_per_second"], 3),
                "steady_steps_per_second": round(run["steady_steps_per_second"], 3),
                "out": str(out),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
