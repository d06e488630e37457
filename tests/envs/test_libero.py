"""The real LIBERO simulator (the `libero` extra: `make install-libero`), rendered headless in spawned
workers: the protocol's image and action processing against a literal NumPy/TF statement of the
original's functions on a real observation, TensorFlow kept out of the workers, a success detected
when the goal holds, and the batched harness on one task with two workers, written and resumed.

One scene build costs ~20 s on a loaded 2-core machine, so every case uses libero_goal task 7
("turn on the stove": its goal is one joint) and the cases share a worker where they can.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("libero") is None:
    pytest.skip(
        "LIBERO is not installed: `make install-libero` (pip install -r requirements-libero.txt) to run these",
        allow_module_level=True,
    )

from openvla_jax.envs import libero, libero_protocol  # noqa: E402
from openvla_jax.envs.libero_workers import EnvWorker, LiberoBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE, TASK, STOVE = "libero_goal", 7, "flat_stove_1_button"


@pytest.fixture(scope="module")
def worker():
    w = EnvWorker(LiberoBackend(libero_protocol.ENV_RESOLUTION, wrist=True), wrist=True, timeout=600)  # as for OFT
    try:
        yield w
    finally:
        w.close()


# ---------------------------------------------- the original's functions, restated literally here
def original_image(obs, center_crop: bool):
    """`get_libero_image` + `resize_image` (224) and, with center_crop, `crop_and_resize` (0.9)."""
    import tensorflow as tf

    img = obs["agentview_image"][::-1, ::-1]
    img = tf.image.encode_jpeg(img)
    img = tf.io.decode_image(img, expand_animations=False, dtype=tf.uint8)
    img = tf.image.resize(img, (224, 224), method="lanczos3", antialias=True)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8).numpy()
    if not center_crop:
        return img
    image = tf.image.convert_image_dtype(tf.convert_to_tensor(img), tf.float32)[None]
    side = tf.reshape(tf.clip_by_value(tf.sqrt(0.9), 0, 1), shape=(1,))
    off = (1 - side) / 2
    boxes = tf.stack([off, off, off + side, off + side], axis=1)
    image = tf.image.crop_and_resize(image, boxes, tf.range(1), (224, 224))[0]
    image = tf.clip_by_value(image, 0, 1)
    return tf.image.convert_image_dtype(image, tf.uint8, saturate=True).numpy()


def original_action(action):
    """`normalize_gripper_action(binarize=True)` then `invert_gripper_action`."""
    action = np.array(action, np.float64)
    action[..., -1] = 2 * (action[..., -1] - 0.0) / (1.0 - 0.0) - 1
    action[..., -1] = np.sign(action[..., -1])
    action[..., -1] = action[..., -1] * -1.0
    return action


def original_state(obs):
    """The OFT state: eef pos, `quat2axisangle(eef quat)`, gripper qpos."""
    quat = np.array(obs["robot0_eef_quat"], np.float64)
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = np.sqrt(1.0 - quat[3] * quat[3])
    axis_angle = np.zeros(3) if math.isclose(den, 0.0) else (quat[:3] * 2.0 * math.acos(quat[3])) / den
    return np.concatenate((obs["robot0_eef_pos"], axis_angle, obs["robot0_gripper_qpos"]))


# ------------------------------------------------------------------------------------------- cases
def test_real_observation_processed_as_the_original(worker):
    msg = worker.reset((SUITE, TASK, 0))
    raw = worker.call("raw_observation")
    assert raw["agentview_image"].shape == (256, 256, 3) and raw["agentview_image"].dtype == np.uint8
    assert raw["agentview_image"].std() > 10  # a rendered scene, not a blank buffer
    np.testing.assert_array_equal(msg["image"], raw["agentview_image"][::-1, ::-1])
    np.testing.assert_array_equal(msg["wrist"], raw["robot0_eye_in_hand_image"][::-1, ::-1])
    assert msg["wrist"].shape == (256, 256, 3) and msg["wrist"].std() > 10
    np.testing.assert_allclose(msg["proprio"], original_state(raw), rtol=0, atol=1e-12)
    assert msg["instruction"] == "turn on the stove" and not msg["done"]
    for crop in (False, True):
        ours = libero_protocol.model_images(msg["image"][None], libero_protocol.CENTER_CROP_SCALE if crop else 0.0)
        np.testing.assert_array_equal(ours[0], original_image(raw, crop))
    grid = np.random.default_rng(0).uniform(-1, 1, (64, 7))
    grid[:, -1] = np.r_[np.linspace(0, 1, 61), [0.0, 0.5, 1.0]]  # 0.5 -> sign(0) = 0 in both
    np.testing.assert_array_equal(libero_protocol.env_action(grid), original_action(grid))
    # The worker rendered with Mesa and never imported TensorFlow (this process did, above).
    assert "tensorflow" in sys.modules and worker.call("modules") == []


def test_success_when_the_goal_holds(worker):
    worker.reset((SUITE, TASK, 1))
    noop = libero_protocol.NOOP_ACTION
    assert not worker.step(noop)["done"]  # the stove starts off
    worker.call("set_joint_qpos", {STOVE: 1.0})  # the button turned past its "on" threshold (0.5)
    assert worker.step(noop)["done"]


def test_two_workers_on_real_libero_written_and_resumed(tmp_path):
    kw = dict(tasks=[TASK], trials=2, workers=2, max_steps=3, timeout=600)
    s = libero.evaluate_libero(libero.random_policy(0), SUITE, tmp_path, **kw)
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted(r["trial"] for r in lines) == [0, 1] and all(r["steps"] == 3 for r in lines)
    assert s["this_run"]["workers"] == 2 and s["this_run"]["policy_calls"] == 3  # both episodes per call
    assert s["suites"][SUITE]["tasks"][str(TASK)]["task"] == "turn on the stove"
    again = libero.evaluate_libero(libero.random_policy(0), SUITE, tmp_path, **kw)
    assert again["this_run"]["episodes"] == 0 and again["overall"] == s["overall"]
