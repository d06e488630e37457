"""Per-dataset standardize functions: raw RLDS trajectory -> action float32 `[T, A]` + instruction.

Input: one trajectory, every step field stacked `[T, ...]` (images still encoded), plus
`traj_metadata`. Output: the same dict where `action` is `[T, 7]` = EEF delta xyz (3) + delta rotation
(3) + gripper (1 open, 0 closed) for EEF_POS datasets (the dataset's encoding decides the size,
`configs.ActionEncoding`), `language_instruction` is `[T]` strings, and the observation holds the keys
the dataset's config (`datasets.py`) names for images and proprio. Conventions follow the public
OpenVLA / Octo code: each function says which gripper convention its dataset stores.

This module: the datasets Google converted for Open X-Embodiment (actions as a dict of
`world_vector` / `rotation_delta` / gripper, instruction in the observation), Bridge, LIBERO.
`transforms_external.py` has the "converted externally" datasets (one flat action vector),
`droid.py` the DROID family.
"""

from __future__ import annotations

import tensorflow as tf

from openvla_jax.data.oxe.utils import (
    binarize_gripper_actions,
    invert_gripper_actions,
    rel2abs_gripper_actions,
    relabel_bridge_actions,
)


def cat(*xs) -> tf.Tensor:
    """Concatenate on the last axis after casting each part to float32 (datasets mix f32 / f64 / bool)."""
    return tf.concat([tf.cast(x, tf.float32) for x in xs], axis=-1)


def _instruction_from_obs(traj):
    traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
    return traj


def _drop_first_step(traj):
    """Every step field without step 0 (Bridge's first action is all zeros); metadata kept whole."""
    return {k: (v if k == "traj_metadata" else tf.nest.map_structure(lambda x: x[1:], v)) for k, v in traj.items()}


def _bridge_state(traj):
    state = traj["observation"]["state"]
    traj["observation"]["EEF_state"] = state[:, :6]
    traj["observation"]["gripper_state"] = state[:, -1:]
    return traj


def bridge_oxe(traj):
    """BridgeData V2 as stored in the Open X-Embodiment bucket: dict actions with a boolean
    `open_gripper`; drop step 0, relabel movement from state deltas (drops the last step)."""
    traj = _drop_first_step(traj)
    a = traj["action"]
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], a["open_gripper"][:, None])
    traj = _instruction_from_obs(traj)
    return _bridge_state(relabel_bridge_actions(traj))


def bridge_orig(traj):
    """BridgeData V2 (project release): first step's action is all zero -> drop it; binarize the
    gripper; relabel movement from state deltas (drops the last step)."""
    traj = _drop_first_step(traj)
    traj["action"] = cat(traj["action"][:, :6], binarize_gripper_actions(traj["action"][:, -1])[:, None])
    return _bridge_state(relabel_bridge_actions(traj))


def _world_rot_rel_gripper(traj):
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"][:, 0])
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], g[:, None])
    return _instruction_from_obs(traj)


def rt1(traj):
    """fractal20220817_data (RT-1): relative gripper command (+1 close, -1 open) -> absolute."""
    return _world_rot_rel_gripper(traj)


def kuka(traj):
    """Relative gripper like RT-1; the proprio fields are ZLIB-compressed float32 bytes."""
    traj = _world_rot_rel_gripper(traj)
    obs = traj["observation"]
    key = "clip_function_input/base_pose_tool_reached"
    obs[key] = tf.reshape(tf.io.decode_raw(tf.io.decode_compressed(obs[key], "ZLIB"), tf.float32), (-1, 7))
    grip = tf.io.decode_raw(tf.io.decode_compressed(obs["gripper_closed"], "ZLIB"), tf.float32)
    obs["gripper_closed"] = tf.reshape(grip, (-1, 1))
    return traj


def nyu_door_opening(traj):
    """Relative gripper command like RT-1 (its own function in the original table)."""
    return _world_rot_rel_gripper(traj)


def taco_play(traj):
    """World-frame relative actions; gripper already 1 open / -1 closed -> clip to [0, 1]."""
    obs = traj["observation"]
    obs["state_eef"] = obs["robot_obs"][:, :6]
    obs["state_gripper"] = obs["robot_obs"][:, 7:8]
    a = traj["action"]["rel_actions_world"]
    traj["action"] = cat(a[:, :6], tf.clip_by_value(a[:, -1:], 0, 1))
    return _instruction_from_obs(traj)


def jaco_play(traj):
    """Translation only (rotation zero); relative gripper command -> absolute."""
    obs = traj["observation"]
    obs["state_eef"] = obs["end_effector_cartesian_pos"][:, :6]
    obs["state_gripper"] = obs["end_effector_cartesian_pos"][:, -1:]
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"][:, 0])
    traj["action"] = cat(a["world_vector"], tf.zeros_like(a["world_vector"]), g[:, None])
    return _instruction_from_obs(traj)


def berkeley_cable_routing(traj):
    """No gripper in the data: the gripper column is a constant 0."""
    a = traj["action"]
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], tf.zeros_like(a["world_vector"][:, :1]))
    return _instruction_from_obs(traj)


def roboturk(traj):
    """Absolute gripper, 1 closed -> clip and invert."""
    a = traj["action"]
    g = invert_gripper_actions(tf.clip_by_value(a["gripper_closedness_action"], 0, 1))
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], g)
    return _instruction_from_obs(traj)


def viola(traj):
    """Absolute gripper (a scalar per step), 1 closed -> clip and invert."""
    a = traj["action"]
    g = invert_gripper_actions(tf.clip_by_value(a["gripper_closedness_action"][:, None], 0, 1))
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], g)
    return _instruction_from_obs(traj)


def berkeley_autolab_ur5(traj):
    """Relative gripper (a scalar per step) -> absolute; state = robot_state[6:14]; the depth image
    is renamed to the config's `depth` key."""
    obs = traj["observation"]
    obs["state"] = obs["robot_state"][:, 6:14]
    obs["depth"] = obs.pop("image_with_depth")
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"])
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], g[:, None])
    return _instruction_from_obs(traj)


def toto(traj):
    """Boolean `open_gripper` is already the target convention."""
    a = traj["action"]
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], a["open_gripper"][:, None])
    return _instruction_from_obs(traj)


def language_table(traj):
    """2-D end-effector deltas, padded to 7 with a constant open gripper; instruction stored as
    UTF-32 code points padded with zeros."""
    a = traj["action"]
    traj["action"] = cat(a, tf.zeros_like(a), tf.zeros_like(a), tf.ones_like(a[:, :1]))
    text = tf.strings.unicode_encode(traj["observation"]["instruction"], output_encoding="UTF-8")
    traj["language_instruction"] = tf.strings.split(text, "\x00")[:, :1].to_tensor()[:, 0]
    return traj


def pusht(traj):
    """columbia_cairlab_pusht_real: the gripper command is taken as stored."""
    a = traj["action"]
    traj["action"] = cat(a["world_vector"], a["rotation_delta"], a["gripper_closedness_action"][:, None])
    return _instruction_from_obs(traj)


def bc_z(traj):
    """Actions predict 10 future steps: keep the first; `target_close` 1 = close -> invert."""
    a = traj["action"]
    g = invert_gripper_actions(tf.cast(a["future/target_close"][:, :1], tf.float32))
    traj["action"] = cat(a["future/xyz_residual"][:, :3], a["future/axis_angle_residual"][:, :3], g)
    return _instruction_from_obs(traj)


def libero(traj):
    """OpenVLA's LIBERO RLDS: gripper -1 open / +1 close -> clip to [0, 1] and invert."""
    a, s = traj["action"], traj["observation"]["state"]
    traj["action"] = cat(a[:, :6], invert_gripper_actions(tf.clip_by_value(a[:, -1:], 0, 1)))
    traj["observation"]["EEF_state"] = s[:, :6]
    traj["observation"]["gripper_state"] = s[:, -2:]  # two finger positions
    return traj


def identity(traj):
    """Already in the target convention (also the original's choice for a few datasets)."""
    return traj
