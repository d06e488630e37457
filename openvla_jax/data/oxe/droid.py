"""DROID-family standardize functions and DROID's zero-action chunk filter.

DROID stores velocities in `action_dict` (float64): `cartesian_velocity` `[T, 6]` (xyz + euler, robot
base frame) and `gripper_position` `[T, 1]` (1 = closed); the observation has `cartesian_position`
`[T, 6]` and `gripper_position` `[T, 1]`. T-DROID / PPGM are DROID-rig datasets with flat 7-dim actions.
"""

from __future__ import annotations

import tensorflow as tf

from openvla_jax.data.oxe.transforms import cat
from openvla_jax.data.oxe.utils import binarize_gripper_actions, velocity_to_wrist_frame

# DROID's 1st / 99th action percentiles (first 6 dims), fixed in the original: the chunk filter
# runs after BOUNDS_Q99 normalisation, so "zero motion" there is the normalised value of 0.
DROID_Q01 = (
    -0.7776297926902771,
    -0.5803514122962952,
    -0.5795090794563293,
    -0.6464047729969025,
    -0.7041108310222626,
    -0.8895104378461838,
)
DROID_Q99 = (
    0.7597932070493698,
    0.5726242214441299,
    0.7351000607013702,
    0.6705610305070877,
    0.6464948207139969,
    0.8897542208433151,
)
_SWAP_SEED = 0x5EED


def _proprio(traj):
    obs = traj["observation"]
    obs["proprio"] = cat(obs["cartesian_position"], obs["gripper_position"])
    return traj


def _swap_exterior_cameras(traj):
    """Swap the two exterior cameras for half the episodes, so a one-camera model sees both as primary.

    The original flips a fresh coin per episode read; we draw it from the episode's `_traj_index`
    (set by `TrajDataset.from_rlds`), so a fixed seed gives fixed batches. Without it, no swap.
    """
    if "_traj_index" not in traj:
        return traj
    obs = traj["observation"]
    seed = tf.stack([tf.constant(_SWAP_SEED, tf.int64), tf.cast(traj["_traj_index"][0], tf.int64)])
    swap = tf.random.stateless_uniform([], seed) > 0.5
    one, two = obs["exterior_image_1_left"], obs["exterior_image_2_left"]
    obs["exterior_image_1_left"], obs["exterior_image_2_left"] = tf.cond(swap, lambda: (two, one), lambda: (one, two))
    return traj


def droid(traj):
    """DROID with base-frame actions: velocity (6) + gripper position inverted (1 = open)."""
    vel = traj["action_dict"]["cartesian_velocity"]
    traj["action"] = cat(vel[:, :3], vel[:, 3:6], 1 - traj["action_dict"]["gripper_position"])
    return _proprio(_swap_exterior_cameras(traj))


def droid_wrist(traj):
    """DROID with wrist-frame actions (EEF_R6, 10 dims): translation (3) + R6 rotation (6) +
    gripper position as stored (1 = closed, not inverted, as in the original). No dataset in the
    original table uses it."""
    vel = traj["action_dict"]["cartesian_velocity"]
    wrist = velocity_to_wrist_frame(vel, traj["observation"]["cartesian_position"])
    traj["action"] = cat(wrist, traj["action_dict"]["gripper_position"])
    return _proprio(_swap_exterior_cameras(traj))


def droid_finetuning(traj):
    """DROID-format fine-tuning sets (droid_wipe): base-frame actions, cameras never swapped."""
    vel = traj["action_dict"]["cartesian_velocity"]
    traj["action"] = cat(vel[:, :3], vel[:, 3:6], 1 - traj["action_dict"]["gripper_position"])
    return _proprio(traj)


def _binarized_flat(traj):
    """Flat 7-dim action with a continuous gripper -> binarized; proprio from the DROID fields."""
    a, obs = traj["action"], traj["observation"]
    traj["action"] = cat(a[:, :6], binarize_gripper_actions(a[:, -1])[:, None])
    obs["EEF_state"] = obs["cartesian_position"][:, :6]
    obs["gripper_state"] = obs["gripper_position"][:, -1:]
    return traj


def ppgm(traj):
    return _binarized_flat(traj)


def tdroid(traj):
    return _binarized_flat(traj)


def zero_action_filter(frame: dict) -> tf.Tensor:
    """DROID's chunk filter: keep a frame unless its whole action chunk is "no motion".

    `frame["action"]`: `[K, A]` normalised (BOUNDS_Q99) actions. Returns a scalar bool: True (keep)
    when some step's first 6 dims differ by more than 1e-5 from the normalised 0 of DROID's q01/q99.
    """
    action = tf.cast(frame["action"][:, :6], tf.float32)
    q01, q99 = tf.constant(DROID_Q01, tf.float32), tf.constant(DROID_Q99, tf.float32)
    zero = 2 * (0 - q01) / (q99 - q01 + 1e-8) - 1
    return tf.reduce_any(tf.abs(action - zero) > 1e-5)
