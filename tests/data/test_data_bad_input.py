"""Bad input: each problem raises an error naming dataset, episode and field, or is skipped and
counted when the config says so."""

import types

import numpy as np
import pytest

from openvla_jax.data.oxe import REGISTRY, register_dataset, transforms
from openvla_jax.data.rlds import DataError, RLDSPipeline
from openvla_jax.data.traj import DatasetNotFoundError
from tests.support.rlds_fixtures import make_cfg, write_libero

NAN, EMPTY = "libero_object_no_noops", "libero_10_no_noops"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, rlds):
    d = str(tmp_path_factory.mktemp("bad"))

    def nan_action(e, steps):
        if e == 1:
            steps["action"] = steps["action"].copy()
            steps["action"][2, 3] = np.nan

    def empty_instruction(e, steps):
        if e == 0:
            steps["language_instruction"] = [""] * len(steps["action"])

    write_libero(d, name=NAN, n_episodes=3, override=nan_action)
    write_libero(d, name=EMPTY, n_episodes=3, override=empty_instruction)
    write_libero(d, name="float_images", n_episodes=2, image_dtype=np.float32)
    write_libero(d, name="renamed_camera", n_episodes=2)
    keys = dict(state_keys=["EEF_state", "gripper_state"], standardize=transforms.libero)
    register_dataset("float_images", image_keys={"primary": "image"}, **keys)
    register_dataset("renamed_camera", image_keys={"primary": "agentview_rgb"}, **keys)
    yield types.SimpleNamespace(dir=d, tok=rlds.tok)
    for name in ("float_images", "renamed_camera"):
        REGISTRY.pop(name, None)


def cfg(bad, tmp_path, **kw):
    return make_cfg(types.SimpleNamespace(dir=bad.dir, stats_dir=str(tmp_path)), **kw)


def test_missing_dataset(bad, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="libero_goal_no_noops.*contains: .*float_images"):
        RLDSPipeline(cfg(bad, tmp_path, mixture="libero_goal_no_noops"), bad.tok)
    with pytest.raises(KeyError, match="no config registered for dataset 'my_robot'.*register_dataset"):
        RLDSPipeline(cfg(bad, tmp_path, mixture="my_robot"), bad.tok)


def test_missing_field(bad, tmp_path):
    with pytest.raises(
        DataError,
        match="dataset 'renamed_camera': field 'agentview_rgb' is missing "
        r"\(every episode\).*observation/image",
    ):
        RLDSPipeline(cfg(bad, tmp_path, mixture="renamed_camera"), bad.tok)


def test_wrong_image_dtype(bad, tmp_path):
    with pytest.raises(DataError, match="dataset 'float_images': image field 'image' has dtype float32"):
        RLDSPipeline(cfg(bad, tmp_path, mixture="float_images"), bad.tok)


def test_nan_action_raises_or_is_skipped(bad, tmp_path):
    with pytest.raises(DataError, match=f"dataset {NAN}, episode /libero/1 bad field: action"):
        list(zip(range(3), RLDSPipeline(cfg(bad, tmp_path, mixture=NAN), bad.tok)))
    pipe = RLDSPipeline(cfg(bad, tmp_path, mixture=NAN, on_bad_data="skip"), bad.tok)
    batches = [b for _, b in zip(range(4), pipe)]
    assert all(np.isfinite(b["action"]).all() for b in batches)
    assert pipe.skipped.counts[(NAN, "action (NaN or inf)")] >= 1
    assert (NAN, "/libero/1", "action (NaN or inf)") in pipe.skipped.examples
    assert pipe.statistics[NAN]["num_trajectories"] == 2  # the bad episode is not in the statistics


def test_unlabeled_episode_is_kept_or_skipped(bad, tmp_path):
    from openvla_jax.tokenizer.prompt import prompt_prefix_ids

    empty_prompt = prompt_prefix_ids(bad.tok, "")  # "... take to ?": the original's prompt for ""
    kept = RLDSPipeline(
        cfg(bad, tmp_path, mixture=EMPTY, skip_unlabeled=False, shuffle=False, episode_info=True, batch_size=4), bad.tok
    )
    batches = [b for _, b in zip(range(6), kept)]
    unlabeled = np.concatenate([b["episode_id"] == 0 for b in batches])
    ids = np.concatenate([b["input_ids"][:, : len(empty_prompt)] for b in batches])
    assert unlabeled.any() and kept.skipped.total() == 0
    assert (ids[unlabeled] == empty_prompt).all()
    assert not (ids[~unlabeled] == empty_prompt).all(1).any()
    pipe = RLDSPipeline(cfg(bad, tmp_path, mixture=EMPTY), bad.tok)  # skip_unlabeled=True: counted
    batches = [b for _, b in zip(range(4), pipe)]
    assert len(batches) == 4
    assert pipe.skipped.counts[(EMPTY, "language_instruction (empty in every step)")] >= 1
    assert pipe.statistics[EMPTY]["num_trajectories"] == 3  # statistics still cover it
