"""Gripper conventions, chunking, rotation conversion and augmentation against NumPy/SciPy/hand values."""

import numpy as np
import tensorflow as tf

from openvla_jax.data import transforms as X
from openvla_jax.data.oxe import utils as U


def np_binarize(a):
    out, carry = np.empty_like(a), a[-1]
    for i in reversed(range(len(a))):
        carry = 1.0 if a[i] > 0.95 else 0.0 if a[i] < 0.05 else carry
        out[i] = carry
    return out


def np_rel2abs(g):
    th = np.where(g < -0.1, 1, np.where(g > 0.1, -1, 0))
    nz = np.nonzero(th)[0]
    carry = -th[nz[0]] if len(nz) else 1
    out = []
    for v in th:
        carry = v if v != 0 else carry
        out.append(carry)
    return np.array(out, np.float32) / 2 + 0.5


def test_binarize_hand_and_numpy():
    # backwards: last is in-between -> keeps its raw value 0.5 (the original's scan initialiser)
    a = np.array([0.5, 1.0, 0.3, 0.0, 0.5], np.float32)
    np.testing.assert_allclose(U.binarize_gripper_actions(a).numpy(), [1, 1, 0, 0, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.choice([0.0, 0.01, 0.4, 0.96, 1.0], 12).astype(np.float32)
        np.testing.assert_allclose(U.binarize_gripper_actions(a).numpy(), np_binarize(a))


def test_rel2abs_hand_and_numpy():
    g = np.array([0, 0, 1, 0, -1, 0], np.float32)  # close at 2, open at 4; starts open
    np.testing.assert_allclose(U.rel2abs_gripper_actions(g).numpy(), [1, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(U.rel2abs_gripper_actions(np.zeros(3, np.float32)).numpy(), [1, 1, 1])
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = rng.choice([-1.0, 0.0, 0.0, 1.0, 0.05], 10).astype(np.float32)
        np.testing.assert_allclose(U.rel2abs_gripper_actions(g).numpy(), np_rel2abs(g))


def test_quaternion_to_euler_matches_scipy():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(2)
    q = Rotation.random(20, random_state=3).as_quat()  # x, y, z, w
    want = Rotation.from_quat(q).as_euler("xyz")
    got = U.quaternion_to_euler(q.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)
    del rng


def test_chunk_act_obs_matches_numpy():
    T, W, F = 5, 2, 2
    traj = {
        "observation": {"x": np.arange(T, dtype=np.float32)[:, None]},
        "action": np.arange(T * 3, dtype=np.float32).reshape(T, 3) + 1,
    }
    absolute = [False, False, True]  # the last dim is an absolute (gripper-like) command
    out = X.chunk_act_obs(traj, W, F, absolute_mask=absolute)
    for t in range(T):
        obs_idx = [max(i, 0) for i in range(t - W + 1, t + 1)]
        np.testing.assert_array_equal(out["observation"]["x"][t, :, 0].numpy(), obs_idx)
        want = []
        for i in range(t - W + 1, t + F + 1):
            a = traj["action"][min(max(i, 0), T - 1)].copy()
            if i > T - 1:  # past the end: relative dims neutral (0), absolute ones repeat the last
                a[:2] = 0
            want.append(a)
        np.testing.assert_array_equal(out["action"][t].numpy(), want)
        np.testing.assert_array_equal(
            out["observation"]["pad_mask"][t].numpy(), [i >= 0 for i in range(t - W + 1, t + 1)]
        )
    assert out["action"][T - 1, -1].numpy().tolist() == [0.0, 0.0, traj["action"][T - 1, 2]]
    every_relative = X.chunk_act_obs(traj, 1, 1)  # no mask given: all dims relative
    np.testing.assert_array_equal(every_relative["action"][T - 1, 1].numpy(), [0.0, 0.0, 0.0])
    one = X.chunk_act_obs(traj, 1, 0)  # OpenVLA: one action per frame
    np.testing.assert_array_equal(one["action"][:, 0].numpy(), traj["action"])


def test_augment_seeded_and_in_range():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    a = X.augment_image(img, tf.constant([1, 2], tf.int64)).numpy()
    b = X.augment_image(img, tf.constant([1, 2], tf.int64)).numpy()
    c = X.augment_image(img, tf.constant([1, 3], tf.int64)).numpy()
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
    assert np.abs(a.astype(int) - img.astype(int)).mean() > 1


def test_resize_is_lanczos3_rounded():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    out = X.resize_image(img, (16, 16)).numpy()
    ref = tf.image.resize(img.astype(np.float32), (16, 16), "lanczos3", antialias=True).numpy()
    np.testing.assert_array_equal(out, np.clip(np.round(ref), 0, 255).astype(np.uint8))


def test_subsample_keeps_ordered_unique_steps_per_seed():
    traj = {"action": np.arange(10, dtype=np.float32)[:, None], "x": np.arange(10)}
    a = X.subsample(traj, 4, tf.constant([1, 2], tf.int64))
    b = X.subsample(traj, 4, tf.constant([1, 2], tf.int64))
    kept = a["x"].numpy()
    assert len(kept) == 4 and (np.diff(kept) > 0).all()
    np.testing.assert_array_equal(kept, b["x"].numpy())
    np.testing.assert_array_equal(a["action"][:, 0].numpy(), kept)
    short = X.subsample(traj, 20, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(np.asarray(short["x"]), np.arange(10))


def test_mixture_tables():
    from openvla_jax.data.oxe import MIXTURES, REGISTRY

    soup = dict(MIXTURES["oxe_magic_soup_plus_minus"])
    assert len(soup) == 25
    assert (soup["fractal20220817_data"], soup["bridge_orig"], soup["taco_play"], soup["bc_z"]) == (1.0, 1.0, 2.0, 0.2)
    assert abs(soup["kuka"] - 0.834) < 1e-3 and "droid" not in soup and "language_table" not in soup
    plus = dict(MIXTURES["oxe_magic_soup_plus"])
    assert plus["droid"] == 0.06 and plus["language_table"] == 0.1
    assert MIXTURES["bridge"] == [("bridge_orig", 1.0)]
    for names in MIXTURES.values():
        for name, _ in names:
            assert name in REGISTRY, name
    assert REGISTRY["libero_10_no_noops"].action_mask == [True] * 6 + [False]
