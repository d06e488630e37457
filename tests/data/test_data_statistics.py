"""Statistics vs NumPy, the JSON cache (hit, invalidation), normalisation formulas and round trips."""

import json

import numpy as np
import pytest

from openvla_jax.data import normalize as N
from openvla_jax.data import statistics as S
from openvla_jax.data.oxe import REGISTRY, register_dataset
from openvla_jax.data.rlds import RLDSPipeline
from tests.data.test_data_standardize import np_standardized
from tests.support.rlds_fixtures import make_cfg

NAME = "libero_spatial_no_noops"


def np_stats(x):
    """The original's definition: NumPy statistics of the float32 transitions along time."""
    x = np.asarray(x, np.float32)
    return {
        "mean": x.mean(0),
        "std": x.std(0),
        "max": x.max(0),
        "min": x.min(0),
        "q01": np.quantile(x, 0.01, axis=0),
        "q99": np.quantile(x, 0.99, axis=0),
    }


def test_statistics_equal_numpy_and_cache(rlds, tmp_path):
    cfg = make_cfg(rlds, mixture=NAME, statistics_dir=str(tmp_path), proprio=True)
    pipe = RLDSPipeline(cfg, rlds.tok)
    assert pipe.statistics_cache_hit[NAME] is False
    std = np_standardized(NAME, rlds.raw[NAME])
    for key, arr in (("action", np.concatenate([a for a, _ in std])), ("proprio", np.concatenate([p for _, p in std]))):
        for stat, val in np_stats(arr).items():
            np.testing.assert_allclose(
                pipe.statistics[NAME][key][stat], val, rtol=1e-6, atol=1e-7, err_msg=f"{key}.{stat}"
            )
    assert pipe.statistics[NAME]["num_transitions"] == sum(len(a) for a, _ in std)
    assert pipe.statistics[NAME]["num_trajectories"] == len(std)
    assert pipe.statistics[NAME]["action"]["mask"] == [True] * 6 + [False]
    assert len(list(tmp_path.glob("dataset_statistics_*.json"))) == 1

    again = RLDSPipeline(cfg, rlds.tok)  # same dataset + transform: read from the cache
    assert again.statistics_cache_hit[NAME] is True
    np.testing.assert_allclose(again.statistics[NAME]["action"]["q99"], pipe.statistics[NAME]["action"]["q99"])

    original = REGISTRY[NAME]

    def doubled(traj):  # a changed transform must invalidate the cache
        traj = original.standardize(traj)
        traj["action"] = traj["action"] * 2.0
        return traj

    try:
        register_dataset(NAME, standardize=doubled, image_keys=original.image_keys, state_keys=original.state_keys)
        changed = RLDSPipeline(cfg, rlds.tok)
    finally:
        REGISTRY[NAME] = original
    assert changed.statistics_cache_hit[NAME] is False
    np.testing.assert_allclose(
        changed.statistics[NAME]["action"]["max"], 2 * np.asarray(pipe.statistics[NAME]["action"]["max"]), rtol=1e-6
    )
    assert len(list(tmp_path.glob("dataset_statistics_*.json"))) == 2

    # Without proprio the block summarises zeros shaped like the actions, as released checkpoints hold.
    no_proprio = RLDSPipeline(make_cfg(rlds, mixture=NAME, statistics_dir=str(tmp_path)), rlds.tok)
    assert no_proprio.statistics_cache_hit[NAME] is False  # a different file: proprio is in the key
    block = no_proprio.statistics[NAME]["proprio"]
    assert set(block) == {"mean", "std", "max", "min", "q01", "q99"}
    assert all(block[k] == [0.0] * 7 for k in block)
    assert len(list(tmp_path.glob("dataset_statistics_*.json"))) == 3
    np.testing.assert_array_equal(no_proprio.statistics[NAME]["action"]["q99"], pipe.statistics[NAME]["action"]["q99"])

    path = S.save_dataset_statistics(pipe.statistics, str(tmp_path / "run"))
    loaded = json.load(open(path))
    assert set(loaded[NAME]) >= {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(loaded[NAME]["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert S.load_dataset_statistics(str(tmp_path / "run")) == loaded


STATS = {
    "q01": [-1.0, 0.0, 2.0, 0.0],
    "q99": [1.0, 4.0, 2.0, 1.0],
    "min": [-2.0, -1.0, 2.0, 0.0],
    "max": [2.0, 5.0, 2.0, 1.0],
    "mean": [0.0, 2.0, 2.0, 0.5],
    "std": [1.0, 2.0, 0.0, 0.5],
    "mask": [True, True, True, False],
}


def test_bounds_q99_hand_values_tf_matches_numpy():
    x = np.array([[0.5, 1.0, 2.0, 0.7], [3.0, -5.0, 2.0, 1.0]], np.float32)
    # dim0: 2(0.5+1)/2-1 = 0.5; dim1: 2*1/4-1 = -0.5; dim2: min == max -> 0; dim3: gripper untouched.
    want = np.array([[0.5, -0.5, 0.0, 0.7], [1.0, -1.0, 0.0, 1.0]], np.float32)  # row 2 clipped
    np.testing.assert_allclose(N.normalize(x, STATS), want, atol=1e-6)
    for kind in N.SCHEMES:
        np.testing.assert_allclose(N.normalize_tf(x, STATS, kind).numpy(), N.normalize(x, STATS, kind), atol=1e-6)
    # NORMAL: (x - mean) / (std + 1e-8) on masked dims
    np.testing.assert_allclose(N.normalize(x, STATS, N.NORMAL)[0, :2], [0.5, -0.5], atol=1e-6)


def test_normalize_unnormalize_round_trip():
    rng = np.random.default_rng(0)
    x = rng.uniform([-1, 0, 2, 0], [1, 4, 2, 1], (100, 4)).astype(np.float32)
    x[:, 3] = rng.integers(0, 2, 100)
    for kind, tol in ((N.BOUNDS_Q99, 1e-5), (N.BOUNDS, 1e-5), (N.NORMAL, 1e-5)):
        back = N.unnormalize(N.normalize(x, STATS, kind), STATS, kind)
        np.testing.assert_allclose(back[:, [0, 1, 3]], x[:, [0, 1, 3]], atol=tol, err_msg=kind)


def test_unnorm_key_selection():
    stats = {"bridge_orig": {"action": STATS}, "fractal20220817_data": {"action": STATS}}
    assert N.select_unnorm_key({"a": {}}) == "a"
    with pytest.raises(ValueError, match="bridge_orig.*fractal20220817_data"):
        N.select_unnorm_key(stats)
    with pytest.raises(ValueError, match="'nope' not in norm_stats; available: \\['bridge_orig'"):
        N.select_unnorm_key(stats, "nope")
    assert N.action_stats(stats, "bridge_orig") is STATS
