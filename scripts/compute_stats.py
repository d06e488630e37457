"""Compute a dataset's normalisation statistics in the original's `dataset_statistics.json` format.

    python scripts/compute_stats.py --data_dir ~/tensorflow_datasets --dataset bridge_orig --out_dir runs/stats

For a new robot: register the dataset first (`openvla_jax.data.oxe.register_dataset`, e.g. in a
module passed with --register=my_package.my_robot). Statistics cover every episode of every split,
labeled or not, as the original computes them; with --proprio the proprio block is the robot state's
(else the 7-dim zero block released checkpoints hold). Writes {out_dir}/dataset_statistics.json
({dataset: stats}, the layout `norm_stats` and `DataConfig.dataset_statistics` take).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from openvla_jax.data import statistics as S  # noqa: E402
from openvla_jax.data.rlds import compute_dataset_statistics  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Directory holding the prepared tfds dataset folders.", required=True)
    flags.DEFINE_multi_string("dataset", None, "Registered dataset name(s).", required=True)
    flags.DEFINE_string("out_dir", ".", "Where dataset_statistics.json is written.")
    flags.DEFINE_bool("proprio", False, "Summarise the robot state (else a zero block shaped like the actions).")
    flags.DEFINE_string("on_bad_data", "raise", "'raise' on an episode with a non-finite action, or 'skip' it.")
    flags.DEFINE_multi_string("register", [], "Modules to import first (they register datasets).")


def run(
    data_dir: str,
    datasets: list[str],
    out_dir: str,
    proprio: bool = False,
    on_bad_data: str = "raise",
    progress: bool = True,
) -> str:
    """Compute (or read from the cache) each dataset's statistics and write them; returns the path."""
    stats = {
        name: compute_dataset_statistics(name, data_dir, proprio=proprio, on_bad_data=on_bad_data, progress=progress)
        for name in datasets
    }
    path = S.save_dataset_statistics(stats, out_dir)
    for name, st in stats.items():
        print(
            f"{name}: {st['num_trajectories']} trajectories, {st['num_transitions']} transitions; "
            f"action q01 {json.dumps([round(v, 4) for v in st['action']['q01']])} "
            f"q99 {json.dumps([round(v, 4) for v in st['action']['q99']])}"
        )
    print(f"wrote {path}")
    return path


def main(argv) -> None:
    del argv
    for module in FLAGS.register:
        importlib.import_module(module)
    run(FLAGS.data_dir, FLAGS.dataset, FLAGS.out_dir, FLAGS.proprio, FLAGS.on_bad_data)


if __name__ == "__main__":
    define_flags()
    app.run(main)
