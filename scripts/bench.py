"""Benchmark suite: JAX against the PyTorch reference, same config, same machine, one run.

  python scripts/bench.py --case train,predict --config tiny,small --repeats 5 --out results.json
  python scripts/bench.py --case all --config tiny --profile /tmp/prof   # + TensorBoard traces

Cases: train | predict | llama | data | convert | serve | quant | actions | all (all but convert).
Each model case warms up, reports medians over --repeats, the JAX/PyTorch speed ratio (PyTorch at
its best: sdpa, and bf16 autocast when faster), FLOPs per step and MFU against --peak_tflops or a
known accelerator's peak ("n/a" on CPU); predict also prints the bandwidth-bound rate on known
GPUs/TPUs. One JSON line per row on stdout; --out writes {"meta", "results"}. See BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

flags.DEFINE_string("case", "train,predict", "comma-separated cases, or 'all'")
flags.DEFINE_string("config", "tiny,small", "comma-separated model variants from configs/model.py")
flags.DEFINE_integer("repeats", 5, "timed repeats (median reported)")
flags.DEFINE_string("out", None, "write {meta, results} as JSON here")
flags.DEFINE_float("peak_tflops", None, "peak TFLOP/s of one device for MFU (default: known accelerators)")
flags.DEFINE_string("profile", None, "write a jax.profiler trace of each case's JAX side under this directory")
flags.DEFINE_integer("batch", 8, "rows for the llama and train cases")
flags.DEFINE_integer("seq_len", 128, "tokens per row for the llama forward case")
flags.DEFINE_integer("train_len", 48, "text tokens per row for the train case (plus the image patches)")
flags.DEFINE_list("predict_batches", ["1", "8", "32"], "batch sizes for predict (and quant)")
flags.DEFINE_bool(
    "interleave",
    False,
    "time in rounds of one call per side (fairer under changing load; "
    "but a PyTorch step slows the XLA step after it on CPU)",
)
flags.DEFINE_bool(
    "torch", True, "time the PyTorch reference too (--notorch: JAX only in train and predict, e.g. 7B on a GPU host)"
)
flags.DEFINE_list("jax_dtypes", ["float32", "bfloat16"], "JAX compute dtypes timed (the faster is reported as JAX's)")
flags.DEFINE_string("work_dir", None, "scratch directory for the convert case (default: a temp dir)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from benchmarks.suite import Options, case_names, device_info, machine, run_suite

    try:
        names = case_names(FLAGS.case)
    except ValueError as e:
        raise app.UsageError(str(e))
    opts = Options(
        repeats=FLAGS.repeats,
        batch=FLAGS.batch,
        seq_len=FLAGS.seq_len,
        train_len=FLAGS.train_len,
        predict_batches=tuple(int(b) for b in FLAGS.predict_batches),
        peak_tflops=FLAGS.peak_tflops,
        profile_dir=FLAGS.profile,
        work_dir=FLAGS.work_dir,
        torch=FLAGS.torch,
        interleave=FLAGS.interleave,
        jax_dtypes=tuple(FLAGS.jax_dtypes),
    )
    print(json.dumps(dict(machine(), **device_info(opts))), flush=True)
    out = run_suite(
        names,
        FLAGS.config.split(","),
        opts,
        emit=lambda row: print(json.dumps(row), flush=True),
        skip_unavailable=FLAGS.case == "all",
    )
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
