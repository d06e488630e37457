"""Step schemas of the Open X-Embodiment datasets, and synthetic episodes in them.

`SCHEMAS[name]` is the nested dict of one RLDS step's fields (the OXE dataset cards / tfds feature
specs), each leaf a `Field(shape, dtype, kind)`; only the fields a standardize function or config
reads, plus the common RLDS flags. Images are encoded bytes (the pipeline skips decoding); depth
tensors are shrunk to 4x4 to keep tests fast. `kind` picks values that exercise the conversions:
relative gripper commands, grippers near 0 / 1, unit quaternions, ZLIB-compressed floats, ...
Shapes we could not check against a card are marked "assumed".
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

INSTRUCTION = "put the red cup in the sink"
_EXT = "_converted_externally_to_rlds"


@dataclasses.dataclass(frozen=True)
class Field:
    shape: tuple = ()
    dtype: str = "float32"
    kind: str = "normal"


def F(*shape, kind="normal", dtype="float32"):
    return Field(tuple(shape), dtype, kind)


def F64(*shape, kind="normal"):
    return Field(tuple(shape), "float64", kind)


IMG = Field((), "string", "image")
TEXT = Field((), "string", "text")
DEPTH = Field((4, 4, 1), "float32")


def _obs_lang(**obs):
    """Google-converted datasets: instruction in the observation."""
    return {**obs, "natural_language_instruction": TEXT}


def _flat(obs: dict, action: Field) -> dict:
    """ "Converted externally" datasets: flat action vector, instruction a step field."""
    return {"observation": obs, "action": action, "language_instruction": TEXT}


_RT1_ACTION = {
    "world_vector": F(3),
    "rotation_delta": F(3),
    "gripper_closedness_action": F(1, kind="rel"),
    "terminate_episode": F(3, dtype="int32"),
}
_DROID_STEP = {
    "observation": {
        "exterior_image_1_left": IMG,
        "exterior_image_2_left": IMG,
        "wrist_image_left": IMG,
        "cartesian_position": F64(6, kind="small"),
        "gripper_position": F64(1, kind="grip"),
        "joint_position": F64(7),
    },
    "action_dict": {
        "cartesian_velocity": F64(6, kind="small"),
        "gripper_position": F64(1, kind="grip"),
        "cartesian_position": F64(6),
        "joint_position": F64(7),
    },
    "action": F64(7),
    "language_instruction": TEXT,
}
_TDROID_STEP = _flat(
    {"static_image": IMG, "static_depth_image": DEPTH, "cartesian_position": F(6), "gripper_position": F(1)},
    F(7, kind="grip_last"),
)
_LIBERO_STEP = _flat({"image": IMG, "wrist_image": IMG, "state": F(8), "joint_state": F(7)}, F(7))
_GNM_STEP = _flat({"image": IMG, "position": F64(2), "state": F64(3), "yaw": F64(1)}, F64(2))

# fmt: off
SCHEMAS: dict[str, dict] = {
    "fractal20220817_data": {"observation": _obs_lang(image=IMG, base_pose_tool_reached=F(7), gripper_closed=F(1)),
                             "action": _RT1_ACTION},
    "kuka": {"observation": _obs_lang(image=IMG, **{"clip_function_input/base_pose_tool_reached": F(kind="zlib7"),
                                                  "gripper_closed": F(kind="zlib1")}),
             "action": _RT1_ACTION},
    "bridge_oxe": {"observation": _obs_lang(image=IMG, state=F(7)),
                   "action": {"world_vector": F(3), "rotation_delta": F(3), "open_gripper": F(dtype="bool"),
                              "terminate_episode": F()}},
    "bridge_orig": _flat({f"image_{i}": IMG for i in range(4)} | {"state": F(7)}, F(7, kind="grip_last")),
    "taco_play": {"observation": _obs_lang(rgb_static=IMG, rgb_gripper=IMG, depth_static=F(4, 4), depth_gripper=F(4, 4),
                                           robot_obs=F(15)),
                  "action": {"rel_actions_world": F(7), "rel_actions_gripper": F(7), "actions": F(7)}},
    "jaco_play": {"observation": _obs_lang(image=IMG, image_wrist=IMG, end_effector_cartesian_pos=F(7), joint_pos=F(8)),
                  "action": {"world_vector": F(3), "gripper_closedness_action": F(1, kind="rel"),
                             "terminate_episode": F(1, dtype="int32")}},
    "berkeley_cable_routing": {"observation": _obs_lang(image=IMG, top_image=IMG, wrist45_image=IMG,
                                                        wrist225_image=IMG, robot_state=F(7)),
                               "action": {"world_vector": F(3), "rotation_delta": F(3), "terminate_episode": F()}},
    "roboturk": {"observation": _obs_lang(front_rgb=IMG),
                 "action": {"world_vector": F(3), "rotation_delta": F(3), "gripper_closedness_action": F(1),
                            "terminate_episode": F()}},
    "nyu_door_opening_surprising_effectiveness": {
        "observation": _obs_lang(image=IMG),
        "action": {"world_vector": F(3), "rotation_delta": F(3), "gripper_closedness_action": F(1, kind="rel"),
                   "terminate_episode": F()}},
    "viola": {"observation": _obs_lang(agentview_rgb=IMG, eye_in_hand_rgb=IMG, joint_states=F(7), gripper_states=F(2),
                                       ee_states=F(16)),
              "action": {"world_vector": F(3), "rotation_delta": F(3), "gripper_closedness_action": F(),
                         "terminate_episode": F()}},
    "berkeley_autolab_ur5": {"observation": _obs_lang(image=IMG, hand_image=IMG, image_with_depth=DEPTH,
                                                      robot_state=F(15)),
                             "action": {"world_vector": F(3), "rotation_delta": F(3),
                                        "gripper_closedness_action": F(kind="rel"), "terminate_episode": F()}},
    "toto": {"observation": _obs_lang(image=IMG, state=F(7)),
             "action": {"world_vector": F(3), "rotation_delta": F(3), "open_gripper": F(dtype="bool"),
                        "terminate_episode": F()}},
    "language_table": {"observation": {"rgb": IMG, "effector_translation": F(2), "effector_target_translation": F(2),
                                       "instruction": F(512, dtype="int32", kind="codes")},
                       "action": F(2)},
    "columbia_cairlab_pusht_real": {"observation": _obs_lang(image=IMG, wrist_image=IMG, robot_state=F(2)),
                                    "action": {"world_vector": F(3), "rotation_delta": F(3),
                                               "gripper_closedness_action": F(), "terminate_episode": F()}},
    "stanford_kuka_multimodal_dataset" + _EXT: _flat(
        {"image": IMG, "depth_image": DEPTH, "ee_position": F(3), "ee_orientation": F(4), "state": F(8),
         "joint_pos": F(7)}, F(4)),
    "nyu_rot_dataset" + _EXT: _flat({"image": IMG, "state": F(7)}, F(7)),
    "stanford_hydra_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(27)}, F(7)),
    "austin_buds_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(24)}, F(7)),
    "nyu_franka_play_dataset" + _EXT: _flat(
        {"image": IMG, "image_additional_view": IMG, "depth": F(4, 4, 1, dtype="int32", kind="int"),
         "depth_additional_view": F(4, 4, 1, dtype="int32", kind="int"), "state": F(13)}, F(15)),
    "maniskill_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "depth": IMG, "wrist_depth": IMG,
                                       "tcp_pose": F(7), "state": F(18), "base_pose": F(7)}, F(7)),
    "furniture_bench_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(35)}, F(8, kind="quat37")),
    "cmu_franka_exploration_dataset" + _EXT: _flat({"highres_image": IMG, "image": IMG, "structured_action": F(8)},
                                                   F(8)),
    "ucsd_kitchen_dataset" + _EXT: _flat({"image": IMG, "state": F(21)}, F(8)),
    "ucsd_pick_and_place_dataset" + _EXT: _flat({"image": IMG, "state": F(7)}, F(4)),
    "austin_sailor_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(8), "state_ee": F(16)}, F(7)),
    "austin_sirius_dataset" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(8), "state_ee": F(16)}, F(7)),
    "bc_z": {"observation": _obs_lang(image=IMG, **{"present/xyz": F(3), "present/axis_angle": F(3),
                                                  "present/sensed_close": F(1)}),
             "action": {"future/xyz_residual": F(30), "future/axis_angle_residual": F(30),
                        "future/target_close": F(10, dtype="int64", kind="int")}},
    "utokyo_pr2_opening_fridge" + _EXT: _flat({"image": IMG, "state": F(7)}, F(8)),
    "utokyo_pr2_tabletop_manipulation" + _EXT: _flat({"image": IMG, "state": F(7)}, F(8)),
    "utokyo_xarm_pick_and_place" + _EXT: _flat({"image": IMG, "image2": IMG, "hand_image": IMG,
                                                "end_effector_pose": F(6), "joint_state": F(14)}, F(7)),
    "utokyo_xarm_bimanual" + _EXT: _flat({"image": IMG, "pose_l": F(6), "pose_r": F(6), "action_l": F(7),
                                          "action_r": F(7)}, F(14)),
    "robo_net": _flat({"image": IMG, "image1": IMG, "image2": IMG, "state": F(5)}, F(5)),
    "berkeley_mvp" + _EXT: _flat({"hand_image": IMG, "pose": F(7), "gripper": F(dtype="bool"), "joint_pos": F(7)},
                                 F(8)),
    "berkeley_rpt" + _EXT: _flat({"hand_image": IMG, "joint_pos": F(7), "gripper": F(dtype="bool")}, F(8)),
    "kaist_nonprehensile" + _EXT: _flat({"image": IMG, "state": F(21)}, F(20)),
    "stanford_mask_vit" + _EXT: _flat({"image": IMG, "end_effector_pose": F(5), "proprio": F(15)}, F(5)),
    "tokyo_u_lsmo" + _EXT: _flat({"image": IMG, "state": F(13)}, F(7)),
    "dlr_sara_pour" + _EXT: _flat({"image": IMG, "state": F(6)}, F(7)),
    "dlr_sara_grid_clamp" + _EXT: _flat({"image": IMG, "state": F(12)}, F(7)),
    "dlr_edan_shared_control" + _EXT: _flat({"image": IMG, "state": F(7)}, F(7)),
    "asu_table_top" + _EXT: {**_flat({"image": IMG, "state": F(7), "state_vel": F(7)}, F(7)),
                             "ground_truth_states": {"EE": F(6), "bottle": F(6)}},
    "stanford_robocook" + _EXT: _flat({"image_1": IMG, "image_2": IMG, "depth_1": F(4, 4), "depth_2": F(4, 4),
                                       "state": F(7)}, F(7)),
    "imperialcollege_sawyer_wrist_cam": _flat({"image": IMG, "wrist_image": IMG, "state": F(1)}, F(8)),
    "iamlab_cmu_pickup_insert" + _EXT: _flat({"image": IMG, "wrist_image": IMG, "state": F(20)}, F(8, kind="quat37")),
    "uiuc_d3field": _flat({"image_1": IMG, "image_2": IMG, "depth_1": IMG, "depth_2": IMG, "state": F(4, 4)}, F(3)),
    "utaustin_mutex": _flat({"image": IMG, "wrist_image": IMG, "state": F(24)}, F(7)),
    "berkeley_fanuc_manipulation": _flat({"image": IMG, "wrist_image": IMG, "state": F(13),
                                          "end_effector_state": F(7)}, F(6)),
    "cmu_playing_with_food": _flat({"image": IMG, "finger_vision_1": IMG, "state": F(8)}, F(8, kind="quat37")),
    "cmu_play_fusion": _flat({"image": IMG, "state": F(8)}, F(9)),
    "cmu_stretch": _flat({"image": IMG, "state": F(4)}, F(8)),
    "berkeley_gnm_recon": _GNM_STEP,
    "berkeley_gnm_cory_hall": _GNM_STEP,
    "berkeley_gnm_sac_son": _GNM_STEP,
    "droid": _DROID_STEP,
    "fmb_dataset": _flat({"image_side_1": IMG, "image_side_2": IMG, "image_wrist_1": IMG, "image_side_1_depth": IMG,
                          "image_side_2_depth": IMG, "image_wrist_1_depth": IMG, "eef_pose": F(7),
                          "state_gripper_pose": F(), "joint_pos": F(7)}, F(7)),
    "dobbe": _flat({"wrist_image": IMG, "state": F(7)}, F(7)),
    "roboset": _flat({"image_left": IMG, "image_right": IMG, "image_top": IMG, "image_wrist": IMG, "state": F(8)},
                     F(8)),
    # rh20t: tcp_base width assumed 6 (xyz + euler), the EEF_POS layout its config promises.
    "rh20t": {"observation": {"image_front": IMG, "image_side_right": IMG, "image_wrist": IMG, "tcp_base": F(6),
                              "gripper_width": F()},
              "action": {"tcp_base": F(6), "gripper": F()}, "language_instruction": TEXT},
    **{name: _TDROID_STEP for name in ("tdroid_carrot_in_bowl", "tdroid_pour_corn_in_pot", "tdroid_flip_pot_upright",
                                       "tdroid_move_object_onto_plate", "tdroid_knock_object_over",
                                       "tdroid_cover_object_with_towel")},
    "droid_wipe": _DROID_STEP,
    **{name: _LIBERO_STEP for name in ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops",
                                       "libero_10_no_noops")},
    "bridge_dataset": None,  # same as bridge_orig, filled below
    "demo_tabletop": _flat({"image": IMG, "state": F(7)}, F(7)),  # ours: scripts/make_demo_data.py
}
# fmt: on
SCHEMAS["bridge_dataset"] = SCHEMAS["bridge_orig"]
# Not a dataset in the original's config table, only a standardize key: a DROID-rig layout.
SCHEMAS["ppgm"] = _TDROID_STEP


def _leaf(field: Field, t: int, rng: np.random.Generator, path: str) -> np.ndarray:
    shape = (t, *field.shape)
    kind = field.kind
    if kind == "image":
        return np.array([f"{path}-jpeg-{i}".encode() for i in range(t)], dtype=object)
    if kind == "text":
        return np.array([INSTRUCTION.encode()] * t, dtype=object)
    if kind == "codes":  # UTF-32 code points, zero padded
        codes = np.zeros(shape, np.int32)
        codes[:, : len(INSTRUCTION)] = [ord(c) for c in INSTRUCTION]
        return codes
    if kind in ("zlib7", "zlib1"):  # float32 bytes, ZLIB-compressed, one string per step
        n = 7 if kind == "zlib7" else 1
        return np.array([zlib.compress(rng.normal(size=n).astype(np.float32).tobytes()) for _ in range(t)], object)
    if field.dtype == "bool":
        return rng.random(shape) < 0.5
    if kind == "int":
        return rng.integers(0, 2, shape).astype(field.dtype)
    if kind == "rel":  # relative gripper: -1 open, +1 close, 0 no change
        x = rng.choice([-1.0, 0.0, 0.0, 1.0], shape)
    elif kind == "grip":  # continuous gripper in [0, 1], some in between
        x = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0], shape)
    elif kind == "small":  # angles / velocities in a range without gimbal lock
        x = rng.uniform(-0.8, 0.8, shape)
    else:
        x = rng.normal(size=shape) * 0.8
        if kind == "grip_last":
            x[..., -1] = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0], t)
        if kind == "quat37":  # unit quaternions (x, y, z, w) in dims 3:7, pitch away from +-90 degrees
            q = rng.normal(size=(t, 4)) * [0.3, 0.3, 0.3, 1.0]
            x[..., 3:7] = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return x.astype(field.dtype)


def make_episode(name: str, t: int = 6, seed: int = 0) -> dict:
    """One synthetic episode of dataset `name`: every step field stacked `[t, ...]` (NumPy), plus the
    RLDS flags and what `TrajDataset.from_rlds` adds (`traj_metadata`, `_traj_index`, `_len`)."""
    if SCHEMAS.get(name) is None:
        raise KeyError(f"no step schema for dataset {name!r} in tests/data/oxe_schemas.py")
    rng = np.random.default_rng(seed)

    def build(spec, path):
        if isinstance(spec, Field):
            return _leaf(spec, t, rng, path)
        return {k: build(v, f"{path}/{k}") for k, v in spec.items()}

    episode = build(SCHEMAS[name], name)
    episode.update(
        is_first=np.arange(t) == 0,
        is_last=np.arange(t) == t - 1,
        is_terminal=np.arange(t) == t - 1,
        reward=np.zeros(t, np.float32),
        discount=np.ones(t, np.float32),
        traj_metadata={"episode_metadata/file_path": np.array([b"episode.h5"] * t, object)},
        _traj_index=np.full(t, seed, np.int64),
        _len=np.full(t, t, np.int32),
    )
    return episode
