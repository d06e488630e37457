"""The original pipeline's numbers on a Bridge-format dataset where, as in the real BridgeData V2
release, some episodes have no instruction: statistics over every episode (labeled or not) against a
NumPy statement of the original's definition, statistics in the original's file format (7-dim zero
proprio block) accepted and used exactly, the split read in order, episode ids and timesteps, and the
original's epoch length."""

import types

import numpy as np
import pytest

from openvla_jax.data import normalize as N
from openvla_jax.data.rlds import DataError, RLDSPipeline
from openvla_jax.data.traj import open_builder
from tests.data.test_data_standardize import np_standardized
from tests.support.rlds_fixtures import make_cfg, write_bridge

NAME = "bridge_orig"
INSTRUCTIONS = ["put the spoon in the pot", "", "open the drawer", "wipe the table", ""]


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory, rlds):
    d = str(tmp_path_factory.mktemp("unlabeled"))
    raw = write_bridge(d, n_episodes=10, T=(5, 9), seed=3, instructions=INSTRUCTIONS)
    return types.SimpleNamespace(dir=d, raw=raw, tok=rlds.tok, std=np_standardized(NAME, raw))


def cfg(data, tmp_path, **kw):
    return make_cfg(types.SimpleNamespace(dir=data.dir, stats_dir=str(tmp_path)), mixture=NAME, **kw)


def original_statistics(std) -> dict:
    """The original's `get_dataset_statistics` in NumPy: every episode, float32, proprio not loaded."""
    action = np.concatenate([a for a, _ in std]).astype(np.float32)

    def summary(x):
        return {
            "mean": x.mean(0),
            "std": x.std(0),
            "max": x.max(0),
            "min": x.min(0),
            "q01": np.quantile(x, 0.01, axis=0),
            "q99": np.quantile(x, 0.99, axis=0),
        }

    return {
        "action": summary(action),
        "proprio": summary(np.zeros_like(action)),
        "num_transitions": len(action),
        "num_trajectories": len(std),
    }


def test_statistics_cover_every_episode_labeled_or_not(unlabeled, tmp_path):
    pipe = RLDSPipeline(cfg(unlabeled, tmp_path), unlabeled.tok)
    got, want = pipe.statistics[NAME], original_statistics(unlabeled.std)
    assert (got["num_transitions"], got["num_trajectories"]) == (want["num_transitions"], 10)
    assert sum(not inst for inst in (r["instruction"] for r in unlabeled.raw)) == 4  # 4 of 10 unlabeled
    for block in ("action", "proprio"):
        assert set(got[block]) >= set(want[block])
        for stat, val in want[block].items():
            np.testing.assert_allclose(got[block][stat], val, rtol=1e-6, atol=1e-7, err_msg=f"{block}.{stat}")
    assert got["action"]["mask"] == [True] * 6 + [False]
    assert pipe.dataset_length == want["num_transitions"]  # one primary dataset: its transitions


def _frames(pipe, n_batches):
    """(episode_id, timestep, action [A]) of each frame of the first `n_batches` batches, in order."""
    out = []
    for _, batch in zip(range(n_batches), pipe):
        out += [(int(e), int(t), a[0]) for e, t, a in zip(batch["episode_id"], batch["timestep"], batch["action"])]
    return out


def test_original_format_statistics_normalise_actions_exactly(unlabeled, tmp_path):
    want = original_statistics(unlabeled.std)
    stats = {
        NAME: {
            "action": {k: v.tolist() for k, v in want["action"].items()} | {"mask": [True] * 6 + [False]},
            "proprio": {k: [0.0] * 7 for k in want["proprio"]},  # the released 7-dim zero block
            "num_transitions": want["num_transitions"],
            "num_trajectories": 10,
        }
    }
    pipe = RLDSPipeline(
        cfg(unlabeled, tmp_path, dataset_statistics=stats, shuffle=False, episode_info=True), unlabeled.tok
    )
    frames = _frames(pipe, 4)
    for e, t, action in frames:
        expect = N.normalize(unlabeled.std[e][0][t], stats[NAME]["action"])
        np.testing.assert_allclose(action, expect, atol=1e-6, err_msg=f"episode {e} step {t}")
    assert len(frames) == 32
    with pytest.raises(DataError, match="proprio statistics are all zeros"):
        RLDSPipeline(cfg(unlabeled, tmp_path, dataset_statistics=stats, proprio=True), unlabeled.tok)
    bad = {NAME: dict(stats[NAME], action={k: v[:6] for k, v in stats[NAME]["action"].items()})}
    with pytest.raises(DataError, match="action statistics have 6 dims but its action encoding has 7"):
        RLDSPipeline(cfg(unlabeled, tmp_path, dataset_statistics=bad), unlabeled.tok)


def test_unshuffled_reads_the_split_in_order_episode_by_episode(unlabeled, tmp_path):
    n_train = open_builder(NAME, unlabeled.dir).info.splits["train[:95%]"].num_examples
    labeled = [e for e in range(n_train) if unlabeled.raw[e]["instruction"]]
    order = [(e, t) for e in labeled for t in range(len(unlabeled.std[e][0]))]
    n = len(order) + 8  # one epoch and the start of the next (training repeats)
    pipe = RLDSPipeline(cfg(unlabeled, tmp_path, shuffle=False, episode_info=True), unlabeled.tok)
    frames = _frames(pipe, -(-n // 8))
    assert [(e, t) for e, t, _ in frames][:n] == (order + order)[:n]
    stats = pipe.statistics[NAME]["action"]
    for e, t, action in frames:
        np.testing.assert_allclose(action, N.normalize(unlabeled.std[e][0][t], stats), atol=1e-6)
    again = RLDSPipeline(cfg(unlabeled, tmp_path, shuffle=False, episode_info=True), unlabeled.tok)
    assert [(e, t) for e, t, _ in _frames(again, 3)] == [(e, t) for e, t, _ in frames[:24]]


def test_episode_ids_name_the_episode_when_shuffled(unlabeled, tmp_path):
    pipe = RLDSPipeline(cfg(unlabeled, tmp_path, episode_info=True, shuffle_buffer=16), unlabeled.tok)
    frames = _frames(pipe, 6)
    stats = pipe.statistics[NAME]["action"]
    assert len({e for e, _, _ in frames}) > 1
    for e, t, action in frames:  # the id and timestep locate the frame's action in the raw data
        np.testing.assert_allclose(action, N.normalize(unlabeled.std[e][0][t], stats), atol=1e-6)
    assert "episode_id" not in next(iter(RLDSPipeline(cfg(unlabeled, tmp_path), unlabeled.tok)))


def test_epoch_length_counts_until_every_primary_dataset_is_seen(rlds, tmp_path):
    mixture = [("libero_spatial_no_noops", 1.0), ("libero_goal_no_noops", 0.5)]
    pipe = RLDSPipeline(make_cfg(rlds, mixture=mixture, statistics_dir=str(tmp_path)), rlds.tok)
    sizes = {n: pipe.statistics[n]["num_transitions"] for n, _ in mixture}
    weights = {n: w * sizes[n] for n, w in mixture}
    share = weights["libero_spatial_no_noops"] / sum(weights.values())
    assert pipe.dataset_length == int(sizes["libero_spatial_no_noops"] / share)
    assert pipe.sample_weights["libero_spatial_no_noops"] == pytest.approx(share)


def test_compute_stats_script_writes_the_original_format(unlabeled, tmp_path):
    import json

    from tests.support.rlds_fixtures import load_script

    script = load_script("compute_stats")
    path = script.run(unlabeled.dir, [NAME], str(tmp_path / "out"), progress=False)
    written, want = json.load(open(path)), original_statistics(unlabeled.std)
    assert list(written) == [NAME]
    assert set(written[NAME]) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert written[NAME]["num_trajectories"] == 10 and written[NAME]["action"]["mask"] == [True] * 6 + [False]
    np.testing.assert_allclose(written[NAME]["action"]["q99"], want["action"]["q99"], rtol=1e-6)
    assert written[NAME]["proprio"]["q01"] == [0.0] * 7
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]  # written whole, no leftovers


def test_max_action_filter_drops_whole_episodes_after_normalisation(unlabeled, tmp_path):
    stats = RLDSPipeline(cfg(unlabeled, tmp_path), unlabeled.tok).statistics[NAME]["action"]
    n_train = open_builder(NAME, unlabeled.dir).info.splits["train[:95%]"].num_examples
    labeled = [e for e in range(n_train) if unlabeled.raw[e]["instruction"]]
    peak = {e: np.abs(N.normalize(unlabeled.std[e][0], stats, N.NORMAL)).max() for e in labeled}
    ranked = sorted(peak.values())  # z-scores are not clipped: a limit between two peaks splits them
    limit = float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    keep = [e for e in labeled if peak[e] <= limit]
    assert 0 < len(keep) < len(labeled)
    pipe = RLDSPipeline(
        cfg(unlabeled, tmp_path, shuffle=False, episode_info=True, normalization=N.NORMAL, max_action=limit),
        unlabeled.tok,
    )
    n = sum(len(unlabeled.std[e][0]) for e in keep)
    frames = _frames(pipe, -(-n // 8))
    assert [(e, t) for e, t, _ in frames][:n] == [(e, t) for e in keep for t in range(len(unlabeled.std[e][0]))]


def test_datasets_the_original_cannot_train_on_are_skipped(rlds, tmp_path):
    mixture = [("libero_spatial_no_noops", 1.0), ("roboset", 1.0)]  # roboset: joint-space actions
    pipe = RLDSPipeline(make_cfg(rlds, mixture=mixture, statistics_dir=str(tmp_path)), rlds.tok)
    assert pipe.mixture == [("libero_spatial_no_noops", 1.0)] and list(pipe.skipped_datasets) == ["roboset"]
    assert "JOINT_POS" in pipe.skipped_datasets["roboset"]
    with pytest.raises(DataError, match="no dataset to train on.*roboset.*JOINT_POS"):
        RLDSPipeline(make_cfg(rlds, mixture="roboset", statistics_dir=str(tmp_path)), rlds.tok)


def test_a_datasets_chunk_filter_drops_frames_after_normalisation(rlds, tmp_path):
    import dataclasses

    from openvla_jax.data.oxe import REGISTRY

    name = "libero_goal_no_noops"
    original = REGISTRY[name]
    REGISTRY[name] = dataclasses.replace(original, chunk_filter=lambda frame: frame["action"][0, 0] > 0)
    try:
        pipe = RLDSPipeline(make_cfg(rlds, mixture=name, statistics_dir=str(tmp_path)), rlds.tok)
        actions = np.concatenate([b["action"][:, 0, 0] for _, b in zip(range(4), pipe)])
    finally:
        REGISTRY[name] = original
    unfiltered = np.concatenate(
        [
            b["action"][:, 0, 0]
            for _, b in zip(
                range(4), RLDSPipeline(make_cfg(rlds, mixture=name, statistics_dir=str(tmp_path)), rlds.tok)
            )
        ]
    )
    assert (actions > 0).all() and (unfiltered <= 0).any()
