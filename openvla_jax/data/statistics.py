"""Dataset statistics (mean / std / min / max / q01 / q99 over all transitions), cached as JSON.

The definition is the original's: every episode of every split (labeled or not), after standardize,
as float32 arrays; NumPy's mean / std / min / max / linear-interpolated quantiles along time. When the
pipeline loads no proprio, the `proprio` block summarises zeros shaped like the actions (what every
released checkpoint's `norm_stats` holds: a 7-dim all-zero block).

The cache file is `dataset_statistics_<hash>.json`, where the hash covers the dataset (name,
version, split sizes, features) and everything that shapes the standardized actions (the dataset
config including the standardize function's source, and the pipeline's filtering options), so
editing a transform recomputes the statistics. `save_dataset_statistics` writes the
`dataset_statistics.json` that sits beside a trained model (same layout as HF `norm_stats`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterable, Mapping

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)


def statistics_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:24]


def builder_fingerprint(builder) -> str:
    info = builder.info
    splits = {k: v.num_examples for k, v in info.splits.items()}
    return f"{info.name}|{info.version}|{sorted(splits.items())}|{info.features!r}"


def _summary(x: np.ndarray) -> dict:
    """Per-dimension statistics of float32 `[N, D]`, computed in float32 as the original does."""
    x = np.asarray(x, np.float32)
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "max": x.max(0).tolist(),
        "min": x.min(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def compute_statistics(
    trajectories: Iterable[Mapping[str, np.ndarray]],
    total: int | None = None,
    desc: str = "statistics",
    progress: bool = True,
) -> dict:
    """Statistics over every transition of an iterable of `{action [T, A], proprio [T, P]}`.

    Empty trajectories count in `num_trajectories` (the original counts them too)."""
    from tqdm.auto import tqdm

    actions, proprios, n_traj = [], [], 0
    for traj in tqdm(trajectories, total=total, desc=desc, disable=not progress, unit="traj"):
        actions.append(np.asarray(traj["action"]))
        proprios.append(np.asarray(traj["proprio"]))
        n_traj += 1
    if not n_traj:
        raise ValueError(f"{desc}: no trajectories to compute statistics over")
    action = np.concatenate(actions).astype(np.float32, copy=False)
    proprio = np.concatenate(proprios).astype(np.float32, copy=False)
    if not len(action):
        raise ValueError(f"{desc}: {n_traj} trajectories but no transitions to compute statistics over")
    stats = {"action": _summary(action), "num_transitions": int(len(action)), "num_trajectories": n_traj}
    stats["proprio"] = _summary(proprio) if proprio.shape[-1] else {}
    return stats


def _read(path: str) -> dict | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:  # not ours (ours are written whole): recompute, say so
            log.warning("ignoring unreadable statistics file %s (%s)", path, e)
            return None


def _write(path: str, obj) -> bool:
    """Write JSON via a temporary file renamed into place: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        return True
    except (tf.errors.OpError, OSError) as e:  # read-only bucket or dir: fall back
        log.warning("could not write %s (%s)", path, e)
        return False


DEFAULT_CACHE = os.path.expanduser("~/.cache/openvla_jax/dataset_statistics")


def cached_statistics(key: str, compute, cache_dirs: Iterable[str | None]) -> tuple[dict, str, bool]:
    """(stats, path, hit): read `dataset_statistics_<key>.json` from the first dir that has it,
    else `compute()` and write it to the first writable dir."""
    dirs = [d for d in cache_dirs if d]
    fname = f"dataset_statistics_{key}.json"
    for d in dirs:
        stats = _read(os.path.join(d, fname))
        if stats is not None:
            return stats, os.path.join(d, fname), True
    stats = compute()
    for d in dirs:
        if _write(os.path.join(d, fname), stats):
            return stats, os.path.join(d, fname), False
    return stats, "", False


def save_dataset_statistics(statistics: Mapping[str, dict], out_dir: str) -> str:
    """Write `{dataset: stats}` as `out_dir/dataset_statistics.json` (lists, JSON-ready)."""

    def plain(x):
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (np.ndarray, list, tuple)):
            return np.asarray(x).tolist()
        return x.item() if isinstance(x, np.generic) else x

    path = os.path.join(out_dir, "dataset_statistics.json")
    if not _write(path, plain(dict(statistics))):
        raise OSError(f"could not write {path}")
    return path


def load_dataset_statistics(path: str) -> dict:
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, "dataset_statistics.json")
    stats = _read(path)
    if stats is None:
        raise FileNotFoundError(f"no dataset statistics at {path}")
    return stats
