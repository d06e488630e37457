"""Does this program fit that slice? Compile the real step for a TPU slice or GPU cluster, on a CPU.

  python scripts/compile_check.py --config=configs/train.py:openvla_7b_pretrain --target=v5p-64 --rows_per_device=8
  python scripts/compile_check.py --config=configs/train.py:openvla_7b_finetune --target=h100:1x8
  python scripts/compile_check.py --predict --model=7b --target=v5e-1 --batch=64
  python scripts/compile_check.py --config=configs/train.py:openvla_7b_pretrain --target=h100:1x8 --find_max_batch
  JAX_PLATFORMS=cuda python scripts/compile_check.py --config=configs/train.py:openvla_7b_finetune \
      --target=local --rows_per_device=8 --run=5      # on a real GPU/TPU host: run it, measured vs planned

Prints per-device memory (argument, output, aliased, temporary, code, peak) against the device's, the
model FLOPs per step and the collectives; exits 1 when the program does not fit (TPU: the compiler's
RESOURCE_EXHAUSTED; GPU: peak above the device's memory), 2 when the runtime is not installed
(`pip install -e ".[aot]"`). Config overrides as in scripts/train.py: `--config.data.batch_size=512`.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openvla_jax.aot.targets import host_setup  # noqa: E402

host_setup()  # before jax starts a backend

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/train.py:<variant>")
flags.DEFINE_string("target", None, "v4-32, v5e-16, v5p-128, v6e-64, v5p:4x4x2, h100:4x8, a100:8, ...", required=True)
flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN")
flags.DEFINE_float("rows_per_device", 0, "per-device batch (0: config.data.batch_size over the devices)")
flags.DEFINE_integer("text_len", 64, "text tokens per training row")
flags.DEFINE_bool("find_max_batch", False, "search the largest per-device batch that fits (guided by the peaks seen)")
flags.DEFINE_bool("predict", False, "compile predict_action instead of a train step")
flags.DEFINE_string("model", "7b", "configs/model.py variant for --predict")
flags.DEFINE_integer("batch", 1, "predict_action batch (--predict)")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens (--predict)")
flags.DEFINE_bool("precheck", True, "report a state too big to hold without compiling it")
flags.DEFINE_string("save", "", "write the serialized executable here")
flags.DEFINE_string("json", "", "append the report as one JSON line to this file")
flags.DEFINE_integer("run", 0, "--target=local only: run the compiled train step this many timed times")
FLAGS = flags.FLAGS


def show(report) -> None:
    """Print a report as soon as it exists (a bisection prints each try), and append it as JSON."""
    print(report.format(), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps(report.table_row()) + "\n")


def main(_):
    from openvla_jax.aot import compile as C
    from openvla_jax.aot.targets import TargetUnavailable, get_target

    try:
        target = get_target(FLAGS.target, FLAGS.num_slices)
    except TargetUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    save = FLAGS.save or None if not FLAGS.find_max_batch else None
    if FLAGS.predict:
        from configs import model as model_configs

        def at(batch):
            r = C.compile_predict(
                model_configs.get_config(FLAGS.model), target, batch, FLAGS.prompt_len, save, FLAGS.precheck
            )
            show(r)
            return r

        if FLAGS.find_max_batch:  # per device: batch = rows x devices
            best, reports = C.find_max_batch(lambda rows: at(rows * target.num_devices), start=FLAGS.batch)
        else:
            reports = [at(FLAGS.batch)]
    else:
        if FLAGS.config is None:
            raise app.UsageError("--config=configs/train.py:<variant> (or --predict)")

        def at(rows):
            r = C.compile_train(FLAGS.config, target, rows, FLAGS.text_len, save, FLAGS.precheck)
            show(r)
            return r

        if FLAGS.find_max_batch:
            best, reports = C.find_max_batch(at, start=int(FLAGS.rows_per_device or 1))
        else:
            reports = [at(FLAGS.rows_per_device or None)]
    if FLAGS.find_max_batch:
        print(f"largest per-device batch that fits on {target.name}: {best}")
        return 0 if best else 1
    if FLAGS.run and not FLAGS.predict and reports[-1].compiled is not None:
        if target.name != "local":
            raise app.UsageError("--run executes on the accelerators of this host: use it with --target=local")
        from openvla_jax.aot.run import run_compiled

        measured = run_compiled(reports[-1], FLAGS.run)
        print(json.dumps(measured), flush=True)
        if FLAGS.json:
            with open(FLAGS.json, "a") as f:
                f.write(json.dumps(measured) + "\n")
    if save and not reports[-1].error:
        print(f"saved the executable to {save}")
    return 0 if reports[-1].fits else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
