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


def euler_to_rotation_matrix(angles: tf.Tensor) -> tf.Tensor:
    """`[..., 3]` roll, pitch, yaw (extrinsic XYZ) -> `[..., 3, 3]` rotation matrix R = Rz(yaw) Ry(pitch) Rx(roll).

    The inverse of `quaternion_to_euler`'s convention (tensorflow_graphics' `rotation_matrix_3d.from_euler`).
    """
    angles = tf.cast(angles, tf.float32)
    sx, sy, sz = tf.unstack(tf.sin(angles), axis=-1)
    cx, cy, cz = tf.unstack(tf.cos(angles), axis=-1)
    rows = [
        [cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz],
        [cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz],
        [-sy, sx * cy, cx * cy],
    ]
    return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)


def rotation_matrix_to_r6(rot: tf.Tensor) -> tf.Tensor:
    """`[..., 3, 3]` rotation matrix -> `[..., 6]` "R6": its first row, then its second row."""
    return tf.concat([rot[..., 0, :], rot[..., 1, :]], axis=-1)  # pyright: ignore[reportArgumentType]  (stubs reject Ellipsis)


def velocity_to_wrist_frame(velocity: tf.Tensor, wrist_pose: tf.Tensor) -> tf.Tensor:
    """Base-frame velocity action -> the same motion seen from the end effector.

    `velocity`: `[T, 6]` translation (3) + rotation as euler angles (3), in the robot base frame.
    `wrist_pose`: `[T, 6]` end-effector xyz + euler angles in the base frame.
    Returns `[T, 9]`: translation R^T dt (3) + R6 of R^T dR R (6), R the wrist's rotation.
    """
    frame = euler_to_rotation_matrix(wrist_pose[:, 3:6])
    frame_inv = tf.linalg.matrix_transpose(frame)  # a rotation's inverse is its transpose
    dt = tf.linalg.matvec(frame_inv, tf.cast(velocity[:, :3], tf.float32))
    d_rot = frame_inv @ euler_to_rotation_matrix(velocity[:, 3:6]) @ frame
    return tf.concat([dt, rotation_matrix_to_r6(d_rot)], axis=-1)
