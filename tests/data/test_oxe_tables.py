"""The Open X-Embodiment tables against the original OpenVLA release: every dataset's standardize
function on a synthetic episode in its real step schema vs a NumPy statement of its convention,
the registry / mixtures / transform grouping vs the original's names and weights, DROID's chunk
filter and camera swap, the encodings' masks."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.transform import Rotation

from openvla_jax.data.oxe import MIXTURES, REGISTRY, STANDARDIZE, check_loadable, get_mixture, loadable_mixture
from openvla_jax.data.oxe import droid as D
from openvla_jax.data.oxe.configs import ActionEncoding, DatasetConfig
from openvla_jax.data.oxe.upstream import ORIGINAL_DATASETS, ORIGINAL_MIXTURES, ORIGINAL_TRANSFORMS
from tests.data.oxe_expected import EXPECTED
from tests.data.oxe_schemas import INSTRUCTION, SCHEMAS, make_episode

_EXT = "_converted_externally_to_rlds"
T = 6
# Camera keys the original config names but the dataset does not have (kept as upstream has them).
UPSTREAM_MISSING_CAMERAS = {("bridge_oxe", "image_1")}


def _to_tf(tree):
    if isinstance(tree, dict):
        return {k: _to_tf(v) for k, v in tree.items()}
    return tf.constant(tree)


def _original_fn(name):
    return ORIGINAL_TRANSFORMS.get(name, "identity")  # demo_tabletop is ours: identity


def _leading_lengths(tree, skip=("traj_metadata",)):
    return {
        k: (_leading_lengths(v) if isinstance(v, dict) else int(v.shape[0])) for k, v in tree.items() if k not in skip
    }


@pytest.mark.parametrize("name", sorted(REGISTRY.keys() | {"ppgm"}))
def test_standardize_matches_numpy(name):
    if name not in SCHEMAS:  # a dataset another test registered at runtime
        pytest.skip(f"{name} is not an OXE table dataset")
    ep = make_episode(name, T, seed=3)
    want = EXPECTED[_original_fn(name)](ep)
    # Through tf.data, in graph mode, as the pipeline runs it.
    traj = tf.data.Dataset.from_tensors(_to_tf(make_episode(name, T, seed=3)))
    out = next(iter(traj.map(STANDARDIZE[name])))
    keep = want.get("keep", np.arange(T))
    t_out = len(keep)

    # Action: float32, the dataset's width, the NumPy values.
    action = out["action"].numpy()
    assert out["action"].dtype == tf.float32, name
    np.testing.assert_allclose(action, np.asarray(want["action"], np.float64), atol=2e-5, err_msg=name)
    cfg = REGISTRY.get(name)
    if cfg is not None and cfg.loadable:
        assert action.shape == (t_out, cfg.action_dim), name

    # Instruction: [T'] strings.
    if "lang" in want:
        lang = want["lang"]
    elif "language_instruction" in ep:
        lang = ep["language_instruction"][keep]
    else:
        lang = ep["observation"]["natural_language_instruction"][keep]
    np.testing.assert_array_equal(out["language_instruction"].numpy(), np.asarray(lang, object), err_msg=name)
    assert set(out["language_instruction"].numpy().tolist()) == {INSTRUCTION.encode()}

    # Every step field (not the metadata) keeps the same steps.
    lengths = tf.nest.flatten(_leading_lengths(out))
    assert set(lengths) == {t_out}, (name, lengths)

    if cfg is None:
        return
    obs, raw = out["observation"], ep["observation"]
    derived = want.get("obs", {})
    for key in [k for k in cfg.state_keys if k is not None] + list(derived):
        assert key in obs, f"{name}: state key {key!r} missing from the standardized observation"
        expect = derived[key] if key in derived else raw[key][keep]
        got = obs[key].numpy().reshape(t_out, -1)
        np.testing.assert_allclose(got, np.asarray(expect, np.float64).reshape(t_out, -1), atol=1e-6, err_msg=key)
    assert not set(want.get("gone", ())) & set(obs), name
    swappable = want.get("swappable", ())
    for key in [k for k in [*cfg.image_keys.values(), *cfg.depth_keys.values()] if k is not None]:
        if (name, key) in UPSTREAM_MISSING_CAMERAS:
            assert key not in obs
            continue
        assert key in obs, f"{name}: camera key {key!r} missing from the standardized observation"
        if key in raw and key not in derived and key not in swappable:
            np.testing.assert_array_equal(obs[key].numpy(), raw[key][keep], err_msg=key)


def test_every_original_dataset_and_mixture_is_registered():
    assert len(ORIGINAL_DATASETS) == 70 and len(ORIGINAL_MIXTURES) == 18
    assert set(ORIGINAL_DATASETS) <= set(REGISTRY)
    assert set(ORIGINAL_MIXTURES) <= set(MIXTURES)
    for mixture in MIXTURES.values():
        assert all(name in REGISTRY for name, _ in mixture), mixture
    # Only the joint-position datasets can't be trained on, as in the original.
    blocked = {n for n, c in REGISTRY.items() if not c.loadable}
    assert blocked == {"berkeley_mvp" + _EXT, "berkeley_rpt" + _EXT, "roboset"}


def test_transform_grouping_matches_original():
    """73 keys, 60 distinct functions, and keys share a function exactly when they do upstream."""
    assert set(ORIGINAL_TRANSFORMS) <= set(STANDARDIZE)
    assert len(ORIGINAL_TRANSFORMS) == 73 and len(set(ORIGINAL_TRANSFORMS.values())) == 60
    ours = {k: STANDARDIZE[k] for k in ORIGINAL_TRANSFORMS}
    assert len(set(ours.values())) == 60
    for a in ORIGINAL_TRANSFORMS:
        for b in ORIGINAL_TRANSFORMS:
            assert (ours[a] is ours[b]) == (ORIGINAL_TRANSFORMS[a] == ORIGINAL_TRANSFORMS[b]), (a, b)
    for name, cfg in REGISTRY.items():
        if name in STANDARDIZE:
            assert cfg.standardize is STANDARDIZE[name], name


def test_dataset_options_spot_checks():
    """A few per-dataset facts from the original configs, by value."""
    droid = REGISTRY["droid"]
    assert droid.image_keys == {
        "primary": "exterior_image_1_left",
        "secondary": "exterior_image_2_left",
        "wrist": "wrist_image_left",
    }
    assert droid.chunk_filter is D.zero_action_filter and int(droid.state_encoding) == 2
    assert REGISTRY["droid_wipe"].image_keys["primary"] == "exterior_image_2_left"
    assert REGISTRY["droid_wipe"].chunk_filter is None
    assert REGISTRY["taco_play"].depth_keys == {"primary": "depth_static", "secondary": None, "wrist": "depth_gripper"}
    assert list(REGISTRY["roboturk"].state_keys) == [None] * 8
    assert list(REGISTRY["imperialcollege_sawyer_wrist_cam"].state_keys) == [None] * 7 + ["state"]
    assert REGISTRY["nyu_door_opening_surprising_effectiveness"].image_keys["wrist"] == "image"
    assert REGISTRY["berkeley_gnm_recon"].image_keys["primary"] is None
    assert REGISTRY["maniskill_dataset" + _EXT].depth_keys["wrist"] == "wrist_depth"
    assert int(REGISTRY["kaist_nonprehensile" + _EXT].state_encoding) == 2  # POS_QUAT
    # describe(): the filter enters the cache key only where there is one.
    assert "chunk_filter=" in droid.describe() and "zero_action_filter" in droid.describe()
    assert "chunk_filter=" not in REGISTRY["bridge_orig"].describe()


def test_mixture_weights_match_original():
    soup = dict(MIXTURES["oxe_magic_soup"])
    assert len(MIXTURES["oxe_magic_soup"]) == 23 and "bc_z" not in soup and "droid" not in soup
    assert soup["fractal20220817_data"] == pytest.approx(0.54087122203) and soup["kuka"] == pytest.approx(0.8341046294)
    assert soup["nyu_franka_play_dataset" + _EXT] == 3.0 and soup["furniture_bench_dataset" + _EXT] == 0.1
    rtx = dict(MIXTURES["rtx"])
    assert len(rtx) == 10 and rtx["berkeley_cable_routing"] == 3.0 and rtx["jaco_play"] == 2.0
    assert rtx["roboturk"] == 1.0 and rtx["berkeley_autolab_ur5"] == 1.0
    assert len(MIXTURES["oxe_magic_soup_plus"]) == 27 and dict(MIXTURES["oxe_magic_soup_plus"])["droid"] == 0.06
    assert len(MIXTURES["rtx_franka"]) == 28  # upstream repeats four datasets
    assert MIXTURES["tdroid_knock_object_over"] == [("tdroid_knock_object_over", 1.0)]
    assert MIXTURES["droid_wipe"] == [("droid_wipe", 1.0)]
    # The loader keeps a repeated dataset's first weight, and skips what it can't train on.
    franka = dict(get_mixture("rtx_franka"))
    assert len(franka) == 24 and franka["taco_play"] == 2.0 and franka["berkeley_cable_routing"] == 3.0
    assert franka["cmu_franka_exploration_dataset" + _EXT] == 5.0
    kept, skipped = loadable_mixture("rtx_franka")
    assert len(kept) == 23 and list(skipped) == ["berkeley_rpt" + _EXT]
    assert "JOINT_POS" in skipped["berkeley_rpt" + _EXT]
    assert get_mixture([("a", 1), ("b", 2), ("a", 3)]) == [("a", 1.0), ("b", 2.0)]


def test_encoding_masks_and_loadability():
    def cfg(enc):
        return DatasetConfig("x", lambda t: t, {"primary": "image"}, action_encoding=enc)

    r6 = cfg(ActionEncoding.EEF_R6)
    assert r6.action_dim == 10 and r6.loadable
    assert r6.action_mask == [True] * 9 + [False] and r6.absolute_action_mask == [False] * 9 + [True]
    pos = cfg(ActionEncoding.EEF_POS)
    assert pos.action_mask == [True] * 6 + [False] and pos.absolute_action_mask == [False] * 6 + [True]
    bi = cfg(ActionEncoding.JOINT_POS_BIMANUAL)
    assert bi.action_dim == 14 and bi.absolute_action_mask == ([False] * 6 + [True]) * 2
    assert check_loadable(r6) is r6
    with pytest.raises(ValueError, match=r"'roboset'.*JOINT_POS"):
        check_loadable(REGISTRY["roboset"])


def _normalize_q99(action):
    """BOUNDS_Q99 as the pipeline applies it, with DROID's hard-coded first-6-dim percentiles."""
    q01 = np.array(
        [
            -0.7776297926902771,
            -0.5803514122962952,
            -0.5795090794563293,
            -0.6464047729969025,
            -0.7041108310222626,
            -0.8895104378461838,
        ]
    )
    q99 = np.array(
        [
            0.7597932070493698,
            0.5726242214441299,
            0.7351000607013702,
            0.6705610305070877,
            0.6464948207139969,
            0.8897542208433151,
        ]
    )
    out = np.array(action, np.float64)
    out[..., :6] = np.clip(2 * (out[..., :6] - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    return out.astype(np.float32)


def test_droid_chunk_filter_drops_all_zero_motion_chunks():
    still = _normalize_q99(np.zeros((3, 7)))  # K = 3 steps of no motion
    grip_only = still.copy()
    grip_only[:, 6] = 0.3  # gripper moves, arm does not: still dropped
    one_move = _normalize_q99(np.zeros((3, 7)))
    one_move[2, 4] += 1e-3  # the last step's rotation moves: kept
    tiny = still.copy()
    tiny[0, 0] += 4e-6  # under the 1e-5 tolerance: dropped
    frames = [still, grip_only, one_move, tiny]
    got = [bool(D.zero_action_filter({"action": tf.constant(a)})) for a in frames]
    assert got == [False, False, True, False]
    # As the pipeline applies it: a tf.data filter over frames.
    ds = tf.data.Dataset.from_tensor_slices({"action": np.stack(frames), "i": np.arange(4)})
    kept = [int(f["i"]) for f in ds.filter(REGISTRY["droid"].chunk_filter)]
    assert kept == [2]


def test_droid_exterior_camera_swap_is_per_episode_and_seeded():
    seen = set()
    for index in range(16):
        ep = _to_tf(make_episode("droid", T, seed=index))
        raw1, raw2 = (
            ep["observation"]["exterior_image_1_left"].numpy(),
            ep["observation"]["exterior_image_2_left"].numpy(),
        )
        out = D.droid(_to_tf(make_episode("droid", T, seed=index)))
        again = D.droid(_to_tf(make_episode("droid", T, seed=index)))
        one, two = (
            out["observation"]["exterior_image_1_left"].numpy(),
            out["observation"]["exterior_image_2_left"].numpy(),
        )
        np.testing.assert_array_equal(one, again["observation"]["exterior_image_1_left"].numpy())
        swapped = bool((one == raw2).all() and (two == raw1).all())
        assert swapped or ((one == raw1).all() and (two == raw2).all())
        np.testing.assert_array_equal(
            out["observation"]["wrist_image_left"].numpy(), ep["observation"]["wrist_image_left"].numpy()
        )
        seen.add(swapped)
    assert seen == {True, False}
    ep = _to_tf(make_episode("droid", T, seed=1))
    del ep["_traj_index"]
    raw = ep["observation"]["exterior_image_1_left"].numpy()
    np.testing.assert_array_equal(D.droid(ep)["observation"]["exterior_image_1_left"].numpy(), raw)


def test_droid_wrist_frame_actions_match_scipy():
    """EEF_R6: translation and rotation of the base-frame velocity, seen from the end effector."""
    ep = make_episode("droid", T, seed=5)
    out = D.droid_wrist(_to_tf(make_episode("droid", T, seed=5)))["action"].numpy()
    vel, pose = ep["action_dict"]["cartesian_velocity"], ep["observation"]["cartesian_position"]
    frame = Rotation.from_euler("xyz", pose[:, 3:6]).as_matrix()
    d_rot = Rotation.from_euler("xyz", vel[:, 3:6]).as_matrix()
    rel = np.transpose(frame, (0, 2, 1)) @ d_rot @ frame
    want = np.concatenate(
        [np.einsum("tji,tj->ti", frame, vel[:, :3]), rel[:, 0], rel[:, 1], ep["action_dict"]["gripper_position"]],
        axis=1,
    )
    assert out.shape == (T, 10)
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_script_prints_full_coverage(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "oxe_tables.py"), run_name="__main__")
    line = capsys.readouterr().out
    assert "datasets 70/70, transforms 60/60, mixtures 18/18 of the original's tables" in line
    assert "libero_mix" in line and "demo_tabletop" in line
