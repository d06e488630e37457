"""OpenVLA's LIBERO evaluation protocol as data and pure functions (no simulator, no TensorFlow at
import, so an environment worker can import it).

Facts from OpenVLA's `experiments/robot/libero/run_libero_eval.py`, `libero_utils.py` and
`robot_utils.py` (and OpenVLA-OFT's for the wrist camera and proprio):
  * per suite, the episode's step limit (`MAX_STEPS`: the longest training demo plus a margin),
    after `NUM_STEPS_WAIT` = 10 no-op steps (`NOOP_ACTION`) while the dropped objects settle;
  * 50 trials per task, trial i starting from the suite's i-th stored initial state;
  * the environment renders at 256 x 256 and is seeded 0 before the initial state is set;
  * the model sees the agent-view camera rotated by 180 degrees (`img[::-1, ::-1]`), JPEG
    encoded and decoded, resized to 224 with TF lanczos3 + antialias, and, for a model trained with
    random crops, center-cropped to area 0.9 and resized back (`models/preprocess.py`, mode
    "train_jpeg"; the HF processor's own resize is then the identity);
  * the model's gripper (0 close .. 1 open, as the RLDS loader standardised it) becomes the
    environment's (-1 open, +1 close): 2 a - 1, the sign, then negated (`env_action`);
  * `unnorm_key` is the suite's name, or `<suite>_no_noops` when only that is in the statistics;
  * success is the environment's `done` (the task's goal predicates hold); an episode ends there.
OFT: the wrist camera (`robot0_eye_in_hand_image`) rotated the same way as a second image, proprio
= (eef position 3, eef orientation as axis-angle 3, gripper joint positions 2), and each predicted
chunk executed open loop before the model is asked again.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_STEPS_WAIT = 10
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
TRIALS_PER_TASK = 50
ENV_RESOLUTION = 256
ENV_SEED = 0
MODEL_IMAGE_SIZE = 224
CENTER_CROP_SCALE = 0.9  # area fraction, for models trained with random-resized-crop augmentation
IMAGE_RESIZE = "train_jpeg"  # models/preprocess.py: JPEG round trip + TF lanczos3
AGENTVIEW_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"
PROPRIO_DIM = 8


def check_suite(suite: str) -> str:
    if suite not in MAX_STEPS:
        raise ValueError(f"unknown LIBERO suite {suite!r}; one of {', '.join(SUITES)}")
    return suite


def camera_frame(obs: Mapping, key: str = AGENTVIEW_KEY) -> np.ndarray:
    """A LIBERO observation's camera image, rotated by 180 degrees as the training data was stored:
    uint8 `[H, W, 3]` (contiguous copy)."""
    return np.ascontiguousarray(np.asarray(obs[key])[::-1, ::-1])


def quat_to_axis_angle(quat) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle (radians) `[3]`, as robosuite's `quat2axisangle`
    (w clipped to [-1, 1]; a rotation too close to zero gives zeros)."""
    q = np.array(quat, np.float64)
    w = min(max(q[3], -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def proprio_state(obs: Mapping) -> np.ndarray:
    """OFT's proprio `[8]` float64: eef position, eef axis-angle, the two gripper finger joints."""
    return np.concatenate(
        [
            np.asarray(obs["robot0_eef_pos"], np.float64),
            quat_to_axis_angle(obs["robot0_eef_quat"]),
            np.asarray(obs["robot0_gripper_qpos"], np.float64),
        ]
    )


def env_action(action) -> np.ndarray:
    """The model's un-normalised action(s) `[..., 7]` (gripper 0 = close, 1 = open) -> what
    LIBERO's controller takes: gripper 2 a - 1, binarised by its sign, then negated (-1 open,
    +1 close). Float64 copy; the other six values pass unchanged."""
    a = np.array(action, np.float64)
    if a.shape[-1] != 7:
        raise ValueError(f"expected LIBERO actions [..., 7], got shape {a.shape}")
    a[..., -1] = -np.sign(2.0 * a[..., -1] - 1.0)
    return a


def unnorm_key_for(suite: str, norm_stats: Optional[Mapping] = None) -> str:
    """The statistics a LIBERO-finetuned checkpoint un-normalises with: the suite's name, or
    `<suite>_no_noops` (the datasets with no-op steps removed) when only that one is present."""
    check_suite(suite)
    if norm_stats is None or suite in norm_stats:
        return suite
    if f"{suite}_no_noops" in norm_stats:
        return f"{suite}_no_noops"
    raise KeyError(
        f"the checkpoint's norm_stats have neither {suite!r} nor {suite + '_no_noops'!r}: {sorted(norm_stats)}"
    )


def model_images(frames, center_crop: float = 0.0, size: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """Rotated camera frames uint8 `[B, H, W, 3]` -> the model's uint8 `[B, size, size, 3]`: the
    evaluation resize (JPEG round trip, lanczos3) and, when `center_crop` > 0, the center crop of that
    area. Imports TensorFlow: call it in the policy's process, never in an environment worker."""
    from openvla_jax.models.preprocess import resize_uint8_images

    return resize_uint8_images(frames, size, IMAGE_RESIZE, center_crop)
