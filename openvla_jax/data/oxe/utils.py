"""Action-convention helpers shared by the per-dataset standardize functions (TensorFlow, [T, ...]).

Target convention for the gripper: 1 = open, 0 = closed, absolute (not relative) commands.
"""

from __future__ import annotations

import tensorflow as tf


def invert_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """Closed=1/open=0 -> open=1/closed=0."""
    return 1.0 - actions


def binarize_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """`[T]` continuous gripper command -> {0, 1}.

    > 0.95 is open (1), < 0.05 closed (0); an in-between value takes the next step's binarized value
    (scanning backwards from the end), so a gripper in motion is labelled with where it is going.
    The scan starts from the raw last value, as the original does.
    """
    actions = tf.cast(actions, tf.float32)
    open_mask, closed_mask = actions > 0.95, actions < 0.05
    in_between = tf.logical_not(tf.logical_or(open_mask, closed_mask))
    is_open = tf.cast(open_mask, tf.float32)

    def step(carry, i):
        return tf.where(in_between[i], carry, is_open[i])

    return tf.scan(step, tf.range(tf.shape(actions)[0]), actions[-1], reverse=True)


def rel2abs_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """`[T]` relative gripper command (-1 open, +1 close, 0 no change) -> absolute {0 closed, 1 open}.

    Steps with no command repeat the last command; before the first command the gripper is assumed
    to be in the opposite state of that first command (open if there is no command at all).
    """
    actions = tf.cast(actions, tf.float32)
    opening, closing = actions < -0.1, actions > 0.1
    thresholded = tf.where(opening, 1, tf.where(closing, -1, 0))

    def step(carry, i):
        return tf.where(thresholded[i] == 0, carry, thresholded[i])

    start = -1 * thresholded[tf.argmax(tf.cast(thresholded != 0, tf.int32), output_type=tf.int32)]
    start = tf.where(start == 0, 1, start)
    new = tf.scan(step, tf.range(tf.shape(actions)[0]), start)
    return tf.cast(new, tf.float32) / 2 + 0.5


def relabel_bridge_actions(traj: dict) -> dict:
    """Bridge: movement = next state - state (first 6 dims); drops the last step (it has no next)."""
    state = traj["observation"]["state"]
    movement = state[1:, :6] - state[:-1, :6]
    out = tf.nest.map_structure(lambda x: x[:-1], traj)
    out["action"] = tf.concat([movement, traj["action"][:-1, -1:]], axis=1)
    return out


def quaternion_to_euler(q: tf.Tensor) -> tf.Tensor:
    """`[..., 4]` quaternion (x, y, z, w) -> `[..., 3]` roll, pitch, yaw (extrinsic XYZ).

    Same convention as tensorflow_graphics' `euler.from_quaternion` (away from gimbal lock).
    """
    q = tf.cast(q, tf.float32)
    x, y, z, w = tf.unstack(q, axis=-1)
    r00 = 1.0 - 2.0 * (y * y + z * z)
    r10 = 2.0 * (x * y + w * z)
    r20 = 2.0 * (x * z - w * y)
    r21 = 2.0 * (y * z + w * x)
    r22 = 1.0 - 2.0 * (x * x + y * y)
    pitch = -tf.asin(tf.clip_by_value(r20, -1.0, 1.0))
    return tf.stack([tf.atan2(r21, r22), pitch, tf.atan2(r10, r00)], axis=-1)
