"""Evaluate a checkpoint offline (validation split) and, on the demo task, in closed loop.

  python scripts/evaluate.py --checkpoint runs/demo/export --data_dir data/demo \
      --mixture demo_tabletop --out runs/demo/eval --closed_loop_episodes 50

Writes {out}/results.json and {out}/report.png (and, with closed-loop episodes, {out}/filmstrip.png)
and prints one summary line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_string("checkpoint", None, "converted (or HF) OpenVLA directory, e.g. a training export")
flags.DEFINE_string("data_dir", None, "directory holding the RLDS datasets")
flags.DEFINE_string("mixture", "demo_tabletop", "named mixture or a single dataset name")
flags.DEFINE_integer("max_batches", None, "stop after this many batches (default: the whole split)")
flags.DEFINE_integer("batch_size", 32, "frames per jitted prediction call")
flags.DEFINE_integer("episodes_to_plot", 3, "validation episodes traced in report.png")
flags.DEFINE_string("out", None, "output directory (default: {checkpoint}/eval)")
flags.DEFINE_integer("closed_loop_episodes", 0, "demo-environment episodes (0: skip)")
flags.DEFINE_integer("closed_loop_seed", 0, "seed of the closed-loop episodes")
flags.DEFINE_string("unnorm_key", "demo_tabletop", "statistics for closed-loop actions")
flags.DEFINE_string("dtype", "float32", "compute dtype: float32 or bfloat16")
flags.mark_flags_as_required(["checkpoint", "data_dir"])
flags.DEFINE_enum(
    "image_resize",
    None,
    ["processor", "train", "train_jpeg"],
    "how frames become pixels (default: what the checkpoint records; models/preprocess.py)",
)
flags.DEFINE_float("center_crop", None, "center crop area fraction at inference (default: the checkpoint's)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every dataset it opens at INFO
    from openvla_jax import OpenVLA
    from openvla_jax.data.rlds import DataConfig
    from openvla_jax.evaluate.closed_loop import closed_loop
    from openvla_jax.evaluate.filmstrip import write_filmstrip
    from openvla_jax.evaluate.offline import evaluate_offline
    from openvla_jax.evaluate.report import write_report

    vla = OpenVLA.load(
        FLAGS.checkpoint, dtype=FLAGS.dtype, image_resize=FLAGS.image_resize, center_crop=FLAGS.center_crop
    )
    cfg = DataConfig(
        data_dir=FLAGS.data_dir, mixture=FLAGS.mixture, train=False, batch_size=FLAGS.batch_size, progress=False
    )
    results = evaluate_offline(vla, cfg, max_batches=FLAGS.max_batches, episodes_to_plot=FLAGS.episodes_to_plot)
    results["checkpoint"] = str(FLAGS.checkpoint)
    out = FLAGS.out or str(Path(FLAGS.checkpoint) / "eval")
    film = None
    if FLAGS.closed_loop_episodes:
        cl = closed_loop(
            vla,
            FLAGS.closed_loop_episodes,
            seed=FLAGS.closed_loop_seed,
            unnorm_key=FLAGS.unnorm_key,
            record=6,
            progress=True,
        )
        film = write_filmstrip(cl.pop("recorded"), Path(out) / "filmstrip.png", title=str(FLAGS.checkpoint))
        results["closed_loop"] = cl
    paths = write_report(results, out)
    m = results["metrics"]["overall"]
    line = (
        f"evaluate: {m['frames']} frames, action_accuracy={m['action_accuracy']:.4f} l1={m['l1']:.4f} "
        f"mse={m['mse']:.4f} l1_unnorm={m['l1_unnorm']:.4f} ({results['frames_per_second']:.1f} frames/s)"
    )
    if "closed_loop" in results:
        cl = results["closed_loop"]
        lo, hi = cl["ci95"]
        line += (
            f" closed_loop_success={cl['success_rate']:.3f} (95% CI {lo:.2f}-{hi:.2f}) over {cl['episodes']} episodes"
        )
    print(line + f" -> {paths['json']}, {paths['png']}" + (f", {film}" if film else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
