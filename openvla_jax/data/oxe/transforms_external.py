"""Standardize functions of the Open X-Embodiment datasets "converted externally to RLDS".

These store `action` as one flat float vector per step and the instruction as a step field
`language_instruction`, so most functions only slice the action, fix the gripper convention and name
the proprio pieces. Output convention: see `transforms.py`. Several datasets have identical bodies
but keep their own function, as in the original table (the config hash includes the source).
"""

from __future__ import annotations

import tensorflow as tf

from openvla_jax.data.oxe.transforms import cat
from openvla_jax.data.oxe.utils import invert_gripper_actions, quaternion_to_euler


def _invert_clipped(g: tf.Tensor) -> tf.Tensor:
    """Absolute gripper in [-1 open, 1 closed] (or [0, 1]) -> 1 open / 0 closed."""
    return invert_gripper_actions(tf.clip_by_value(g, 0, 1))


def _eef_gripper_from_state(traj, eef: int = 6):
    """`eef_state` = state[:, :eef], `gripper_state` = the last state entry."""
    s = traj["observation"]["state"]
    traj["observation"]["eef_state"] = s[:, :eef]
    traj["observation"]["gripper_state"] = s[:, -1:]
    return traj


def _drop_last_action_dim(traj):
    traj["action"] = traj["action"][..., :-1]
    return traj


def stanford_kuka_multimodal(traj):
    """Translation + gripper only (rotation zero); depth `[H, W, 1]` -> `[H, W]`."""
    traj["observation"]["depth_image"] = traj["observation"]["depth_image"][..., 0]
    a = traj["action"]
    traj["action"] = cat(a[:, :3], tf.zeros_like(a[:, :3]), a[:, -1:])
    return traj


def nyu_rot(traj):
    traj = _eef_gripper_from_state(traj)
    traj["action"] = traj["action"][..., :7]
    return traj


def stanford_hydra(traj):
    """Gripper 1 closed -> invert; proprio = xyz (state[:3]) + euler (state[7:10]) + gripper."""
    a, s = traj["action"], traj["observation"]["state"]
    traj["action"] = cat(a[:, :6], invert_gripper_actions(a[:, -1:]))
    traj["observation"]["eef_state"] = tf.concat([s[:, :3], s[:, 7:10]], axis=-1)
    traj["observation"]["gripper_state"] = s[:, -3:-2]
    return traj


def austin_buds(traj):
    a = traj["action"]
    traj["action"] = cat(a[:, :6], _invert_clipped(a[:, -1:]))
    traj["observation"]["state"] = traj["observation"]["state"][:, :8]
    return traj


def nyu_franka_play(traj):
    """Action = dims [-8:-2] (delta EEF) + clipped gripper [-2]; depth `[H, W, 1]` int -> float `[H, W]`."""
    obs, a = traj["observation"], traj["action"]
    for key in ("depth", "depth_additional_view"):
        obs[key] = tf.cast(obs[key][..., 0], tf.float32)
    obs["eef_state"] = obs["state"][:, -6:]
    traj["action"] = cat(a[:, -8:-2], tf.clip_by_value(a[:, -2:-1], 0, 1))
    return traj


def maniskill(traj):
    traj["observation"]["gripper_state"] = traj["observation"]["state"][..., 7:8]
    return traj


def furniture_bench(traj):
    """Rotation stored as a quaternion (x, y, z, w) -> euler; gripper 1 closed -> clip and invert."""
    s, a = traj["observation"]["state"], traj["action"]
    traj["observation"]["state"] = tf.concat([s[:, :7], s[:, -1:]], axis=-1)
    traj["action"] = cat(a[:, :3], quaternion_to_euler(a[:, 3:7]), _invert_clipped(a[:, -1:]))
    return traj


def cmu_franka_exploration(traj):
    return _drop_last_action_dim(traj)


def ucsd_kitchen(traj):
    traj["observation"]["joint_state"] = traj["observation"]["state"][:, :7]
    return _drop_last_action_dim(traj)


def ucsd_pick_place(traj):
    """Translation velocity + gripper (rotation zero)."""
    traj = _eef_gripper_from_state(traj)
    a = traj["action"]
    traj["action"] = cat(a[:, :3], tf.zeros_like(a[:, :3]), a[:, -1:])
    return traj


def austin_sailor(traj):
    a = traj["action"]
    traj["action"] = cat(a[:, :6], _invert_clipped(a[:, -1:]))
    return traj


def austin_sirius(traj):
    a = traj["action"]
    traj["action"] = cat(a[:, :6], _invert_clipped(a[:, -1:]))
    return traj


def tokyo_pr2_opening_fridge(traj):
    return _drop_last_action_dim(_eef_gripper_from_state(traj))


def tokyo_pr2_tabletop_manipulation(traj):
    return _drop_last_action_dim(_eef_gripper_from_state(traj))


def utokyo_xarm_pick_place(traj):
    return traj


def utokyo_xarm_bimanual(traj):
    """Two arms' actions, left then right: keep the right arm's 7."""
    traj["action"] = traj["action"][..., -7:]
    return traj


def robo_net(traj):
    """xyz + yaw (4) padded with two zero rotations, then the gripper; same for the proprio."""
    s, a = traj["observation"]["state"], traj["action"]
    traj["observation"]["eef_state"] = tf.concat([s[:, :4], tf.zeros_like(s[:, :2])], axis=-1)
    traj["observation"]["gripper_state"] = s[:, -1:]
    traj["action"] = cat(a[:, :4], tf.zeros_like(a[:, :2]), a[:, -1:])
    return traj


def berkeley_mvp(traj):
    """Joint-position actions (JOINT_POS): not loadable for OpenVLA training, kept as stored."""
    return traj


def berkeley_rpt(traj):
    """Joint-position actions (JOINT_POS): not loadable for OpenVLA training, kept as stored."""
    return traj


def kaist_nonprehensile(traj):
    """First 6 action dims; no gripper -> constant 0; proprio = the last 7 state entries."""
    traj["observation"]["state"] = traj["observation"]["state"][:, -7:]
    a = traj["action"]
    traj["action"] = cat(a[:, :6], tf.zeros_like(a[:, :1]))
    return traj


def stanford_mask_vit(traj):
    """Like robo_net, but the proprio comes from `end_effector_pose`."""
    pose, a = traj["observation"]["end_effector_pose"], traj["action"]
    traj["observation"]["eef_state"] = tf.concat([pose[:, :4], tf.zeros_like(pose[:, :2])], axis=-1)
    traj["observation"]["gripper_state"] = pose[:, -1:]
    traj["action"] = cat(a[:, :4], tf.zeros_like(a[:, :2]), a[:, -1:])
    return traj


def tokyo_lsmo(traj):
    return _eef_gripper_from_state(traj)


def dlr_sara_pour(traj):
    return traj


def dlr_sara_grid_clamp(traj):
    traj["observation"]["state"] = traj["observation"]["state"][:, :6]
    return traj


def dlr_edan_shared_control(traj):
    """Gripper 1 closed -> invert (no clipping)."""
    a = traj["action"]
    traj["action"] = cat(a[:, :6], invert_gripper_actions(a[:, -1:]))
    return traj


def asu_table_top(traj):
    """The end-effector pose is a step field outside the observation (`ground_truth_states/EE`)."""
    traj["observation"]["eef_state"] = traj["ground_truth_states"]["EE"]
    traj["observation"]["gripper_state"] = traj["observation"]["state"][:, -1:]
    return traj


def robocook(traj):
    return _eef_gripper_from_state(traj)


def imperial_wristcam(traj):
    return _drop_last_action_dim(traj)


def iamlab_pick_insert(traj):
    """Rotation stored as a quaternion -> euler; gripper as stored (1 open)."""
    s, a = traj["observation"]["state"], traj["action"]
    traj["observation"]["joint_state"] = s[:, :7]
    traj["observation"]["gripper_state"] = s[:, 7:8]
    traj["action"] = cat(a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, 7:8])
    return traj


def uiuc_d3field(traj):
    """Translation only: rotation and gripper zero."""
    a = traj["action"]
    traj["action"] = cat(a, tf.zeros_like(a), tf.zeros_like(a[:, :1]))
    return traj


def utaustin_mutex(traj):
    a = traj["action"]
    traj["action"] = cat(a[:, :6], _invert_clipped(a[:, -1:]))
    traj["observation"]["state"] = traj["observation"]["state"][:, :8]
    return traj


def berkeley_fanuc(traj):
    """No gripper action stored: use the gripper state (1 closed), inverted."""
    s = traj["observation"]["state"]
    traj["observation"]["joint_state"] = s[:, :6]
    traj["observation"]["gripper_state"] = s[:, 6:7]
    traj["action"] = cat(traj["action"], invert_gripper_actions(s[:, 6:7]))
    return traj


def cmu_playing_with_food(traj):
    """Rotation stored as a quaternion -> euler; gripper as stored."""
    a = traj["action"]
    traj["action"] = cat(a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, -1:])
    return traj


def playfusion(traj):
    """cmu_play_fusion: 9 dims -> the first 3 and the last 4."""
    a = traj["action"]
    traj["action"] = cat(a[:, :3], a[:, -4:])
    return traj


def cmu_stretch(traj):
    """xyz padded with zero rotation; last action dim dropped."""
    s = traj["observation"]["state"]
    traj["observation"]["eef_state"] = tf.concat([s[:, :3], tf.zeros_like(s[:, :3])], axis=-1)
    traj["observation"]["gripper_state"] = s[:, -1:]
    return _drop_last_action_dim(traj)


def gnm(traj):
    """Navigation (berkeley_gnm_*): 2-D waypoint actions padded to 7 with zeros; proprio =
    position (2) + three zeros + yaw (1)."""
    obs, a = traj["observation"], traj["action"]
    obs["state"] = tf.concat([obs["position"], tf.zeros_like(obs["state"][:, :3]), obs["yaw"]], axis=-1)
    traj["action"] = cat(a, tf.zeros_like(a), tf.zeros_like(a), tf.zeros_like(a[:, :1]))
    return traj


def fmb(traj):
    obs = traj["observation"]
    obs["proprio"] = cat(obs["eef_pose"], obs["state_gripper_pose"][..., None])
    return traj


def dobbe(traj):
    traj["observation"]["proprio"] = traj["observation"]["state"]
    return traj


def roboset(traj):
    """Joint-position actions (JOINT_POS); gripper -1..1 -> clip to [0, 1] and invert."""
    traj["observation"]["proprio"] = traj["observation"]["state"]
    a = traj["action"]
    traj["action"] = cat(a[:, :7], _invert_clipped(a[:, -1:]))
    return traj


def rh20t(traj):
    """Dict action: `tcp_base` pose + gripper; proprio = tcp_base + gripper width."""
    a, obs = traj["action"], traj["observation"]
    traj["action"] = cat(a["tcp_base"], a["gripper"][:, None])
    obs["proprio"] = cat(obs["tcp_base"], obs["gripper_width"][..., None])
    return traj
