"""Action / proprio normalisation (OpenVLA's `normalize_action_and_proprio`), NumPy and TensorFlow; `unnorm_key`.

Statistics layout (as `norm_stats` in the HF config and `dataset_statistics.json`):
    {dataset: {"action": {mean, std, max, min, q01, q99, mask}, "proprio": {mean, std, max, min, q01, q99},
               "num_transitions": int, "num_trajectories": int}}

Schemes:
    BOUNDS_Q99: where(mask, clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), x); min == max dims -> 0
    BOUNDS:     the same with min / max
    NORMAL:     where(mask, (x - mean) / (std + 1e-8), x)
The mask keeps the gripper (last dim of EEF_POS actions) in {0 closed, 1 open}.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

NORMAL = "normal"
BOUNDS = "bounds"
BOUNDS_Q99 = "bounds_q99"
SCHEMES = (NORMAL, BOUNDS, BOUNDS_Q99)
EPS = 1e-8


def _check(kind: str):
    if kind not in SCHEMES:
        raise ValueError(f"unknown normalization {kind!r}; expected one of {SCHEMES}")


def _mask(stats: Mapping, dim: int, mask=None) -> np.ndarray:
    if mask is None:
        mask = stats.get("mask", None)
    return np.ones(dim, bool) if mask is None else np.asarray(mask, bool)


def _low_high(stats: Mapping, kind: str):
    lo, hi = ("q01", "q99") if kind == BOUNDS_Q99 else ("min", "max")
    return np.asarray(stats[lo], np.float32), np.asarray(stats[hi], np.float32)


def normalize(x, stats: Mapping, kind: str = BOUNDS_Q99, mask=None) -> np.ndarray:
    """NumPy: float `[..., D]` -> normalised float32 `[..., D]` (D = len(stats['mean']))."""
    _check(kind)
    x = np.asarray(x, np.float32)
    m = _mask(stats, x.shape[-1], mask)
    if kind == NORMAL:
        mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
        return np.where(m, (x - mean) / (std + EPS), x).astype(np.float32)
    low, high = _low_high(stats, kind)
    y = np.where(m, np.clip(2 * (x - low) / (high - low + EPS) - 1, -1, 1), x)
    # Unused dimensions (constant over the dataset) carry no signal: map them to 0.
    const = np.asarray(stats["min"], np.float32) == np.asarray(stats["max"], np.float32)
    return np.where(const, 0.0, y).astype(np.float32)


def normalize_tf(x, stats: Mapping, kind: str = BOUNDS_Q99, mask=None):
    """TensorFlow twin of `normalize` for tf.data maps (float32 `[..., D]`)."""
    import tensorflow as tf

    _check(kind)
    x = tf.cast(x, tf.float32)
    m = tf.constant(_mask(stats, len(stats["mean"]), mask))
    if kind == NORMAL:
        mean = tf.constant(np.asarray(stats["mean"], np.float32))
        std = tf.constant(np.asarray(stats["std"], np.float32))
        return tf.where(m, (x - mean) / (std + EPS), x)
    low, high = (tf.constant(v) for v in _low_high(stats, kind))
    y = tf.where(m, tf.clip_by_value(2 * (x - low) / (high - low + EPS) - 1, -1, 1), x)
    const = tf.constant(np.asarray(stats["min"], np.float32) == np.asarray(stats["max"], np.float32))
    return tf.where(const, tf.zeros_like(y), y)


def unnormalize(a, stats: Mapping, kind: str = BOUNDS_Q99, mask=None) -> np.ndarray:
    """Inverse of `normalize` on masked dims (constant dims come back as low, not the constant).

    Computed in float64 from the JSON statistics, as the original's predict_action does."""
    _check(kind)
    a = np.asarray(a, np.float64)
    m = _mask(stats, a.shape[-1], mask)
    if kind == NORMAL:
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        return np.where(m, a * (std + EPS) + mean, a)
    lo, hi = ("q01", "q99") if kind == BOUNDS_Q99 else ("min", "max")
    low, high = np.asarray(stats[lo], np.float64), np.asarray(stats[hi], np.float64)
    return np.where(m, 0.5 * (a + 1) * (high - low) + low, a)


def select_unnorm_key(norm_stats: Mapping, unnorm_key: str | None = None) -> str:
    """The dataset whose statistics un-normalise actions; required when there is more than one."""
    names = sorted(norm_stats)
    if not names:
        raise ValueError("norm_stats is empty: the checkpoint has no dataset statistics")
    if unnorm_key is None:
        if len(names) > 1:
            raise ValueError(f"norm_stats holds {len(names)} datasets; pass unnorm_key= one of {names}")
        return names[0]
    if unnorm_key not in norm_stats:
        raise ValueError(f"unnorm_key {unnorm_key!r} not in norm_stats; available: {names}")
    return unnorm_key


def action_stats(norm_stats: Mapping, unnorm_key: str | None = None) -> Mapping:
    return norm_stats[select_unnorm_key(norm_stats, unnorm_key)]["action"]


def proprio_stats(norm_stats: Mapping, unnorm_key: str | None = None) -> Mapping:
    """The proprio statistics of the dataset `unnorm_key` names (a model with a proprio token
    normalises the robot state with them, as the pipeline did in training)."""
    key = select_unnorm_key(norm_stats, unnorm_key)
    stats = norm_stats[key].get("proprio")
    if not stats or not len(stats.get("q01", ())):
        raise ValueError(
            f"norm_stats[{key!r}] has no proprio statistics; this model needs them to "
            "normalise the proprio input (train with data.proprio on a dataset with state)"
        )
    return stats
