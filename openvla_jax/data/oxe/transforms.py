"""Per-dataset standardize functions: raw RLDS trajectory -> action float32 `[T, 7]` + instruction.

Input: one trajectory, every step field stacked `[T, ...]` (images still encoded). Output: the same
dict where `action` is `[T, 7]` = EEF delta xyz (3) + delta rotation (3) + gripper (1 open, 0 closed),
`language_instruction` is `[T]` strings, and the observation holds the keys the dataset's config
(`configs.py`) names for images and proprio. Conventions follow the public OpenVLA / Octo code.
"""

from __future__ import annotations

import tensorflow as tf

from openvla_jax.data.oxe.utils import (
    binarize_gripper_actions,
    invert_gripper_actions,
    quaternion_to_euler,
    rel2abs_gripper_actions,
    relabel_bridge_actions,
)


def _cat(*xs):
    return tf.concat([tf.cast(x, tf.float32) for x in xs], axis=-1)


def _instruction_from_obs(traj):
    traj["language_instruction"] = traj["observation"]["natural_language_instruction"]
    return traj


def bridge_orig(traj):
    """BridgeData V2 (project release): first step's action is all zero -> drop it; binarize the
    gripper; relabel movement from state deltas (drops the last step)."""
    traj = {k: (v if k == "traj_metadata" else tf.nest.map_structure(lambda x: x[1:], v))
            for k, v in traj.items()}
    traj["action"] = _cat(traj["action"][:, :6], binarize_gripper_actions(traj["action"][:, -1])[:, None])
    traj = relabel_bridge_actions(traj)
    traj["observation"]["EEF_state"] = traj["observation"]["state"][:, :6]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def _world_rot_rel_gripper(traj):
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"][:, 0])
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], g[:, None])
    return _instruction_from_obs(traj)


def rt1(traj):
    """fractal20220817_data (RT-1): relative gripper command (+1 close, -1 open) -> absolute."""
    return _world_rot_rel_gripper(traj)


def kuka(traj):
    traj = _world_rot_rel_gripper(traj)
    obs = traj["observation"]
    eef = tf.io.decode_raw(tf.io.decode_compressed(obs["clip_function_input/base_pose_tool_reached"],
                                                   compression_type="ZLIB"), tf.float32)
    obs["clip_function_input/base_pose_tool_reached"] = tf.reshape(eef, (-1, 7))
    grip = tf.io.decode_raw(tf.io.decode_compressed(obs["gripper_closed"], compression_type="ZLIB"),
                            tf.float32)
    obs["gripper_closed"] = tf.reshape(grip, (-1, 1))
    return traj


def taco_play(traj):
    obs = traj["observation"]
    obs["state_eef"] = obs["robot_obs"][:, :6]
    obs["state_gripper"] = obs["robot_obs"][:, 7:8]
    a = traj["action"]["rel_actions_world"]
    traj["action"] = _cat(a[:, :6], tf.clip_by_value(a[:, -1:], 0, 1))
    return _instruction_from_obs(traj)


def jaco_play(traj):
    obs = traj["observation"]
    obs["state_eef"] = obs["end_effector_cartesian_pos"][:, :6]
    obs["state_gripper"] = obs["end_effector_cartesian_pos"][:, -1:]
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"][:, 0])
    traj["action"] = _cat(a["world_vector"], tf.zeros_like(a["world_vector"]), g[:, None])
    return _instruction_from_obs(traj)


def berkeley_cable_routing(traj):
    a = traj["action"]
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], tf.zeros_like(a["world_vector"][:, :1]))
    return _instruction_from_obs(traj)


def roboturk(traj):
    a = traj["action"]
    g = invert_gripper_actions(tf.clip_by_value(a["gripper_closedness_action"], 0, 1))
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], g)
    return _instruction_from_obs(traj)


def viola(traj):
    a = traj["action"]
    g = invert_gripper_actions(tf.clip_by_value(a["gripper_closedness_action"][:, None], 0, 1))
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], g)
    return _instruction_from_obs(traj)


def berkeley_autolab_ur5(traj):
    obs = traj["observation"]
    obs["state"] = obs["robot_state"][:, 6:14]
    a = traj["action"]
    g = rel2abs_gripper_actions(a["gripper_closedness_action"])
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], g[:, None])
    return _instruction_from_obs(traj)


def toto(traj):
    a = traj["action"]
    traj["action"] = _cat(a["world_vector"], a["rotation_delta"], a["open_gripper"][:, None])
    return _instruction_from_obs(traj)


def language_table(traj):
    """2-D end-effector deltas, padded to 7 with a constant open gripper; instruction stored as
    UTF-32 code points padded with zeros."""
    a = traj["action"]
    traj["action"] = _cat(a, tf.zeros_like(a), tf.zeros_like(a), tf.ones_like(a[:, :1]))
    text = tf.strings.unicode_encode(traj["observation"]["instruction"], output_encoding="UTF-8")
    traj["language_instruction"] = tf.strings.split(text, "\x00")[:, :1].to_tensor()[:, 0]
    return traj


def stanford_hydra(traj):
    a, s = traj["action"], traj["observation"]["state"]
    traj["action"] = _cat(a[:, :6], invert_gripper_actions(a[:, -1:]))
    traj["observation"]["eef_state"] = tf.concat([s[:, :3], s[:, 7:10]], axis=-1)
    traj["observation"]["gripper_state"] = s[:, -3:-2]
    return traj


def _invert_clip_last(traj):
    a = traj["action"]
    traj["action"] = _cat(a[:, :6], invert_gripper_actions(tf.clip_by_value(a[:, -1:], 0, 1)))
    return traj


def austin_buds(traj):
    traj = _invert_clip_last(traj)
    traj["observation"]["state"] = traj["observation"]["state"][:, :8]
    return traj


def nyu_franka_play(traj):
    obs, a = traj["observation"], traj["action"]
    obs["eef_state"] = obs["state"][:, -6:]
    traj["action"] = _cat(a[:, -8:-2], tf.clip_by_value(a[:, -2:-1], 0, 1))
    return traj


def furniture_bench(traj):
    s, a = traj["observation"]["state"], traj["action"]
    traj["observation"]["state"] = tf.concat([s[:, :7], s[:, -1:]], axis=-1)
    g = invert_gripper_actions(tf.clip_by_value(a[:, -1:], 0, 1))
    traj["action"] = _cat(a[:, :3], quaternion_to_euler(a[:, 3:7]), g)
    return traj


def ucsd_kitchen(traj):
    traj["observation"]["joint_state"] = traj["observation"]["state"][:, :7]
    traj["action"] = traj["action"][..., :-1]
    return traj


def austin_sailor(traj):
    return _invert_clip_last(traj)


def austin_sirius(traj):
    return _invert_clip_last(traj)


def dlr_edan_shared_control(traj):
    a = traj["action"]
    traj["action"] = _cat(a[:, :6], invert_gripper_actions(a[:, -1:]))
    return traj


def iamlab_cmu_pickup_insert(traj):
    s, a = traj["observation"]["state"], traj["action"]
    traj["observation"]["joint_state"] = s[:, :7]
    traj["observation"]["gripper_state"] = s[:, 7:8]
    traj["action"] = _cat(a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, 7:8])
    return traj


def utaustin_mutex(traj):
    traj = _invert_clip_last(traj)
    traj["observation"]["state"] = traj["observation"]["state"][:, :8]
    return traj


def berkeley_fanuc(traj):
    s = traj["observation"]["state"]
    traj["observation"]["joint_state"] = s[:, :6]
    traj["observation"]["gripper_state"] = s[:, 6:7]
    # No gripper action stored: use the (inverted) gripper state.
    traj["action"] = _cat(traj["action"], invert_gripper_actions(s[:, 6:7]))
    return traj


def cmu_stretch(traj):
    s = traj["observation"]["state"]
    traj["observation"]["eef_state"] = tf.concat([s[:, :3], tf.zeros_like(s[:, :3])], axis=-1)
    traj["observation"]["gripper_state"] = s[:, -1:]
    traj["action"] = traj["action"][..., :-1]
    return traj


def bc_z(traj):
    a = traj["action"]
    g = invert_gripper_actions(tf.cast(a["future/target_close"][:, :1], tf.float32))
    traj["action"] = _cat(a["future/xyz_residual"][:, :3], a["future/axis_angle_residual"][:, :3], g)
    return _instruction_from_obs(traj)


def fmb(traj):
    obs = traj["observation"]
    obs["proprio"] = _cat(obs["eef_pose"], obs["state_gripper_pose"][..., None])
    return traj


def dobbe(traj):
    traj["observation"]["proprio"] = traj["observation"]["state"]
    return traj


def droid(traj):
    """DROID, actions in the robot base frame; gripper position inverted (1 = open).

    The original also swaps the two exterior cameras at random; we keep them fixed (OpenVLA
    trains on the primary camera only) so the pipeline stays deterministic.
    """
    ad = traj["action_dict"]
    traj["action"] = _cat(ad["cartesian_velocity"][:, :3], ad["cartesian_velocity"][:, 3:6],
                          1 - ad["gripper_position"])
    obs = traj["observation"]
    obs["proprio"] = _cat(obs["cartesian_position"], obs["gripper_position"])
    return traj


def libero(traj):
    """OpenVLA's LIBERO RLDS: gripper -1 open / +1 close -> clip to [0, 1] and invert."""
    a, s = traj["action"], traj["observation"]["state"]
    traj["action"] = _cat(a[:, :6], invert_gripper_actions(tf.clip_by_value(a[:, -1:], 0, 1)))
    traj["observation"]["EEF_state"] = s[:, :6]
    traj["observation"]["gripper_state"] = s[:, -2:]  # two finger positions
    return traj


def identity(traj):
    return traj
