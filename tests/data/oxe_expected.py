"""What each standardize function must produce, stated in NumPy from the raw episode.

`EXPECTED[original function name](ep)` -> dict with `action` `[T', A]`, optionally `keep` (indices of
the raw steps kept, default all), `obs` (derived observation keys -> `[T', ...]`), `gone` (observation
keys renamed away), `lang` (`[T']` instruction, default the step's or observation's instruction).
Keyed by the original's function names (`upstream.ORIGINAL_TRANSFORMS` values) so each expectation is
written once per function.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.spatial.transform import Rotation

from tests.data.test_data_transforms import np_binarize, np_rel2abs


def cat(*xs):
    return np.concatenate([np.asarray(x, np.float64) for x in xs], axis=-1)


def z(x, n):
    """`[T, n]` zeros."""
    return np.zeros((len(x), n))


def opened(g):
    """Gripper stored 1 = closed (maybe outside [0, 1]) -> clipped, 1 = open."""
    return 1 - np.clip(g, 0, 1)


def euler(q):
    """Quaternion (x, y, z, w) -> extrinsic xyz angles, by SciPy."""
    return Rotation.from_quat(q).as_euler("xyz")


def _rt(ep, gripper):
    a = ep["action"]
    return cat(a["world_vector"], a["rotation_delta"], gripper)


def _rel_gripper(ep):
    return {"action": _rt(ep, np_rel2abs(ep["action"]["gripper_closedness_action"][:, 0])[:, None])}


def _unzip(strings, n):
    return np.stack([np.frombuffer(zlib.decompress(s), np.float32) for s in strings]).reshape(-1, n)


def kuka(ep):
    obs = ep["observation"]
    out = _rel_gripper(ep)
    out["obs"] = {
        "clip_function_input/base_pose_tool_reached": _unzip(obs["clip_function_input/base_pose_tool_reached"], 7),
        "gripper_closed": _unzip(obs["gripper_closed"], 1),
    }
    return out


def _bridge(ep, gripper):
    """Drop step 0, then the last step; movement = next state - state."""
    s = ep["observation"]["state"]
    t = len(s)
    keep = np.arange(1, t - 1)
    return {
        "action": cat(s[2:, :6] - s[1:-1, :6], gripper[1:-1, None]),
        "keep": keep,
        "obs": {"EEF_state": s[keep, :6], "gripper_state": s[keep, -1:]},
    }


def bridge_oxe(ep):
    return _bridge(ep, ep["action"]["open_gripper"].astype(np.float64))


def bridge_orig(ep):
    g = np.full(len(ep["action"]), np.nan)
    g[1:] = np_binarize(ep["action"][1:, 6])  # binarized after dropping step 0
    return _bridge(ep, g)


def taco_play(ep):
    rel, robot = ep["action"]["rel_actions_world"], ep["observation"]["robot_obs"]
    return {
        "action": cat(rel[:, :6], np.clip(rel[:, 6:], 0, 1)),
        "obs": {"state_eef": robot[:, :6], "state_gripper": robot[:, 7:8]},
    }


def jaco_play(ep):
    a, pos = ep["action"], ep["observation"]["end_effector_cartesian_pos"]
    g = np_rel2abs(a["gripper_closedness_action"][:, 0])[:, None]
    return {"action": cat(a["world_vector"], z(g, 3), g), "obs": {"state_eef": pos[:, :6], "state_gripper": pos[:, 6:]}}


def berkeley_autolab_ur5(ep):
    g = np_rel2abs(ep["action"]["gripper_closedness_action"])[:, None]
    obs = ep["observation"]
    return {
        "action": _rt(ep, g),
        "obs": {"state": obs["robot_state"][:, 6:14], "depth": obs["image_with_depth"]},
        "gone": ["image_with_depth"],
    }  # renamed, not copied


def language_table(ep):
    a = ep["action"]
    from tests.data.oxe_schemas import INSTRUCTION

    return {"action": cat(a, z(a, 4), np.ones((len(a), 1))), "lang": np.array([INSTRUCTION.encode()] * len(a))}


def _flat_action(fn):
    return lambda ep: {"action": fn(ep["action"])}


def _eef_grip(ep, action, eef=6):
    s = ep["observation"]["state"]
    return {"action": action, "obs": {"eef_state": s[:, :eef], "gripper_state": s[:, -1:]}}


def _invert_clip_state8(ep):
    a = ep["action"]
    return {"action": cat(a[:, :6], opened(a[:, 6:])), "obs": {"state": ep["observation"]["state"][:, :8]}}


def nyu_franka_play(ep):
    a, obs = ep["action"], ep["observation"]
    return {
        "action": cat(a[:, 7:13], np.clip(a[:, 13:14], 0, 1)),
        "obs": {
            "eef_state": obs["state"][:, 7:13],
            "depth": obs["depth"][..., 0].astype(np.float32),
            "depth_additional_view": obs["depth_additional_view"][..., 0].astype(np.float32),
        },
    }


def _xyz4_zero2_grip(ep, pose):
    a = ep["action"]
    return {
        "action": cat(a[:, :4], z(a, 2), a[:, 4:5]),
        "obs": {"eef_state": cat(pose[:, :4], z(pose, 2)), "gripper_state": pose[:, 4:5]},
    }


def _droid(ep, swappable=True):
    ad, obs = ep["action_dict"], ep["observation"]
    out = {
        "action": cat(ad["cartesian_velocity"], 1 - ad["gripper_position"]),
        "obs": {"proprio": cat(obs["cartesian_position"], obs["gripper_position"])},
    }
    if swappable:
        out["swappable"] = ("exterior_image_1_left", "exterior_image_2_left")
    return out


def _binarized_droid_rig(ep):
    a, obs = ep["action"], ep["observation"]
    return {
        "action": cat(a[:, :6], np_binarize(a[:, 6])[:, None]),
        "obs": {"EEF_state": obs["cartesian_position"][:, :6], "gripper_state": obs["gripper_position"][:, -1:]},
    }


def _obs(**derived):
    """Expectation with the action kept as stored and some derived observation keys."""
    return lambda ep: {"action": ep["action"], "obs": {k: f(ep["observation"]) for k, f in derived.items()}}


# fmt: off
EXPECTED = {
    "bridge_oxe": bridge_oxe, "bridge_orig": bridge_orig, "ppgm": _binarized_droid_rig, "tdroid": _binarized_droid_rig,
    "rt1": _rel_gripper, "kuka": kuka, "nyu_door_opening": _rel_gripper,
    "taco_play": taco_play, "jaco_play": jaco_play,
    "berkeley_cable_routing": lambda ep: {"action": _rt(ep, z(ep["action"]["world_vector"], 1))},
    "roboturk": lambda ep: {"action": _rt(ep, opened(ep["action"]["gripper_closedness_action"]))},
    "viola": lambda ep: {"action": _rt(ep, opened(ep["action"]["gripper_closedness_action"])[:, None])},
    "berkeley_autolab_ur5": berkeley_autolab_ur5,
    "toto": lambda ep: {"action": _rt(ep, ep["action"]["open_gripper"][:, None])},
    "language_table": language_table,
    "pusht": lambda ep: {"action": _rt(ep, ep["action"]["gripper_closedness_action"][:, None])},
    "bc_z": lambda ep: {"action": cat(ep["action"]["future/xyz_residual"][:, :3],
                                      ep["action"]["future/axis_angle_residual"][:, :3],
                                      1 - ep["action"]["future/target_close"][:, :1])},
    "stanford_kuka_multimodal": lambda ep: {
        "action": cat(ep["action"][:, :3], z(ep["action"], 3), ep["action"][:, 3:4]),
        "obs": {"depth_image": ep["observation"]["depth_image"][..., 0]}},
    "nyu_rot": lambda ep: _eef_grip(ep, ep["action"][:, :7]),
    "stanford_hydra": lambda ep: {
        "action": cat(ep["action"][:, :6], 1 - ep["action"][:, 6:]),
        "obs": {"eef_state": cat(ep["observation"]["state"][:, :3], ep["observation"]["state"][:, 7:10]),
                "gripper_state": ep["observation"]["state"][:, 24:25]}},
    "austin_buds": _invert_clip_state8, "utaustin_mutex": _invert_clip_state8,
    "nyu_franka_play": nyu_franka_play,
    "maniskill": _obs(gripper_state=lambda o: o["state"][:, 7:8]),
    "furniture_bench": lambda ep: {
        "action": cat(ep["action"][:, :3], euler(ep["action"][:, 3:7]), opened(ep["action"][:, 7:])),
        "obs": {"state": cat(ep["observation"]["state"][:, :7], ep["observation"]["state"][:, 34:])}},
    "cmu_franka_exploration": _flat_action(lambda a: a[:, :7]),
    "ucsd_kitchen": lambda ep: {"action": ep["action"][:, :7],
                                "obs": {"joint_state": ep["observation"]["state"][:, :7]}},
    "ucsd_pick_place": lambda ep: _eef_grip(ep, cat(ep["action"][:, :3], z(ep["action"], 3), ep["action"][:, 3:])),
    "austin_sailor": _flat_action(lambda a: cat(a[:, :6], opened(a[:, 6:]))),
    "austin_sirius": _flat_action(lambda a: cat(a[:, :6], opened(a[:, 6:]))),
    "tokyo_pr2_opening_fridge": lambda ep: _eef_grip(ep, ep["action"][:, :7]),
    "tokyo_pr2_tabletop_manipulation": lambda ep: _eef_grip(ep, ep["action"][:, :7]),
    "utokyo_xarm_pick_place": _flat_action(lambda a: a),
    "utokyo_xarm_bimanual": _flat_action(lambda a: a[:, 7:]),
    "robo_net": lambda ep: _xyz4_zero2_grip(ep, ep["observation"]["state"]),
    "berkeley_mvp": _flat_action(lambda a: a), "berkeley_rpt": _flat_action(lambda a: a),
    "kaist_nonprehensible": lambda ep: {"action": cat(ep["action"][:, :6], z(ep["action"], 1)),
                                        "obs": {"state": ep["observation"]["state"][:, 14:]}},
    "stanford_mask_vit": lambda ep: _xyz4_zero2_grip(ep, ep["observation"]["end_effector_pose"]),
    "tokyo_lsmo": lambda ep: _eef_grip(ep, ep["action"]),
    "dlr_sara_pour": _flat_action(lambda a: a),
    "dlr_sara_grid_clamp": _obs(state=lambda o: o["state"][:, :6]),
    "dlr_edan_shared_control": _flat_action(lambda a: cat(a[:, :6], 1 - a[:, 6:])),
    "asu_table_top": lambda ep: {"action": ep["action"], "obs": {
        "eef_state": ep["ground_truth_states"]["EE"], "gripper_state": ep["observation"]["state"][:, 6:]}},
    "robocook": lambda ep: _eef_grip(ep, ep["action"]),
    "imperial_wristcam": _flat_action(lambda a: a[:, :7]),
    "iamlab_pick_insert": lambda ep: {
        "action": cat(ep["action"][:, :3], euler(ep["action"][:, 3:7]), ep["action"][:, 7:8]),
        "obs": {"joint_state": ep["observation"]["state"][:, :7], "gripper_state": ep["observation"]["state"][:, 7:8]}},
    "uiuc_d3field": _flat_action(lambda a: cat(a, z(a, 4))),
    "berkeley_fanuc": lambda ep: {
        "action": cat(ep["action"], 1 - ep["observation"]["state"][:, 6:7]),
        "obs": {"joint_state": ep["observation"]["state"][:, :6], "gripper_state": ep["observation"]["state"][:, 6:7]}},
    "cmu_playing_with_food": _flat_action(lambda a: cat(a[:, :3], euler(a[:, 3:7]), a[:, 7:])),
    "playfusion": _flat_action(lambda a: cat(a[:, :3], a[:, 5:])),
    "cmu_stretch": lambda ep: {"action": ep["action"][:, :7], "obs": {
        "eef_state": cat(ep["observation"]["state"][:, :3], z(ep["action"], 3)),
        "gripper_state": ep["observation"]["state"][:, 3:]}},
    "gnm": lambda ep: {"action": cat(ep["action"], z(ep["action"], 5)), "obs": {
        "state": cat(ep["observation"]["position"], z(ep["action"], 3), ep["observation"]["yaw"])}},
    "droid_baseact": _droid, "droid_finetuning": lambda ep: _droid(ep, swappable=False),
    "fmb": _obs(proprio=lambda o: cat(o["eef_pose"], o["state_gripper_pose"][:, None])),
    "dobbe": _obs(proprio=lambda o: o["state"]),
    "roboset": lambda ep: {"action": cat(ep["action"][:, :7], opened(ep["action"][:, 7:])),
                           "obs": {"proprio": ep["observation"]["state"]}},
    "rh20t": lambda ep: {"action": cat(ep["action"]["tcp_base"], ep["action"]["gripper"][:, None]), "obs": {
        "proprio": cat(ep["observation"]["tcp_base"], ep["observation"]["gripper_width"][:, None])}},
    "libero": lambda ep: {"action": cat(ep["action"][:, :6], opened(ep["action"][:, 6:])), "obs": {
        "EEF_state": ep["observation"]["state"][:, :6], "gripper_state": ep["observation"]["state"][:, 6:]}},
    "identity": _flat_action(lambda a: a),
}
# fmt: on
