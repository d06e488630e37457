"""The dataset table: every Open X-Embodiment dataset of the OpenVLA release, plus ours.

`STANDARDIZE` maps each key of the original's standardization table (and ours) to its function; the
`_reg` lines give each dataset its cameras (primary, secondary, wrist), depth images, proprio keys
and encodings, as in the original's per-dataset configs. Notes on deliberate differences:
  - LIBERO's proprio is EEF_state + gripper_state (8 dims, no pad column), as OpenVLA-OFT uses it;
    the original OpenVLA pads it to 9 with a zero column.
  - `droid`, `libero_mix`, `demo_tabletop` as mixtures / datasets are ours (see mixtures.py).
"""

from __future__ import annotations

from openvla_jax.data.oxe import droid as D
from openvla_jax.data.oxe import transforms as T
from openvla_jax.data.oxe import transforms_external as E
from openvla_jax.data.oxe.configs import ActionEncoding, StateEncoding, register_dataset

_EXT = "_converted_externally_to_rlds"
TDROID = (
    "tdroid_carrot_in_bowl",
    "tdroid_pour_corn_in_pot",
    "tdroid_flip_pot_upright",
    "tdroid_move_object_onto_plate",
    "tdroid_knock_object_over",
    "tdroid_cover_object_with_towel",
)
LIBERO = ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops")

# Dataset (or standardize key) -> standardize function. Keys sharing a function here share it in the
# original too (checked against upstream.ORIGINAL_TRANSFORMS in tests).
# fmt: off
STANDARDIZE = {
    "bridge_oxe": T.bridge_oxe, "bridge_orig": T.bridge_orig, "bridge_dataset": T.bridge_orig,
    "ppgm": D.ppgm, "ppgm_static": D.ppgm, "ppgm_wrist": D.ppgm,
    "fractal20220817_data": T.rt1, "kuka": T.kuka, "taco_play": T.taco_play, "jaco_play": T.jaco_play,
    "berkeley_cable_routing": T.berkeley_cable_routing, "roboturk": T.roboturk,
    "nyu_door_opening_surprising_effectiveness": T.nyu_door_opening, "viola": T.viola,
    "berkeley_autolab_ur5": T.berkeley_autolab_ur5, "toto": T.toto, "language_table": T.language_table,
    "columbia_cairlab_pusht_real": T.pusht, "bc_z": T.bc_z,
    "stanford_kuka_multimodal_dataset" + _EXT: E.stanford_kuka_multimodal,
    "nyu_rot_dataset" + _EXT: E.nyu_rot,
    "stanford_hydra_dataset" + _EXT: E.stanford_hydra,
    "austin_buds_dataset" + _EXT: E.austin_buds,
    "nyu_franka_play_dataset" + _EXT: E.nyu_franka_play,
    "maniskill_dataset" + _EXT: E.maniskill,
    "furniture_bench_dataset" + _EXT: E.furniture_bench,
    "cmu_franka_exploration_dataset" + _EXT: E.cmu_franka_exploration,
    "ucsd_kitchen_dataset" + _EXT: E.ucsd_kitchen,
    "ucsd_pick_and_place_dataset" + _EXT: E.ucsd_pick_place,
    "austin_sailor_dataset" + _EXT: E.austin_sailor,
    "austin_sirius_dataset" + _EXT: E.austin_sirius,
    "utokyo_pr2_opening_fridge" + _EXT: E.tokyo_pr2_opening_fridge,
    "utokyo_pr2_tabletop_manipulation" + _EXT: E.tokyo_pr2_tabletop_manipulation,
    "utokyo_xarm_pick_and_place" + _EXT: E.utokyo_xarm_pick_place,
    "utokyo_xarm_bimanual" + _EXT: E.utokyo_xarm_bimanual,
    "robo_net": E.robo_net,
    "berkeley_mvp" + _EXT: E.berkeley_mvp,
    "berkeley_rpt" + _EXT: E.berkeley_rpt,
    "kaist_nonprehensile" + _EXT: E.kaist_nonprehensile,
    "stanford_mask_vit" + _EXT: E.stanford_mask_vit,
    "tokyo_u_lsmo" + _EXT: E.tokyo_lsmo,
    "dlr_sara_pour" + _EXT: E.dlr_sara_pour,
    "dlr_sara_grid_clamp" + _EXT: E.dlr_sara_grid_clamp,
    "dlr_edan_shared_control" + _EXT: E.dlr_edan_shared_control,
    "asu_table_top" + _EXT: E.asu_table_top,
    "stanford_robocook" + _EXT: E.robocook,
    "imperialcollege_sawyer_wrist_cam": E.imperial_wristcam,
    "iamlab_cmu_pickup_insert" + _EXT: E.iamlab_pick_insert,
    "uiuc_d3field": E.uiuc_d3field,
    "utaustin_mutex": E.utaustin_mutex,
    "berkeley_fanuc_manipulation": E.berkeley_fanuc,
    "cmu_playing_with_food": E.cmu_playing_with_food,
    "cmu_play_fusion": E.playfusion,
    "cmu_stretch": E.cmu_stretch,
    "berkeley_gnm_recon": E.gnm, "berkeley_gnm_cory_hall": E.gnm, "berkeley_gnm_sac_son": E.gnm,
    "droid": D.droid, "fmb_dataset": E.fmb, "dobbe": E.dobbe, "roboset": E.roboset, "rh20t": E.rh20t,
    **dict.fromkeys(TDROID, D.tdroid),
    "droid_wipe": D.droid_finetuning,
    **dict.fromkeys(LIBERO, T.libero),
    # Ours: the bundled demo task (scripts/make_demo_data.py), actions already bridge-style.
    "demo_tabletop": T.identity,
}
# fmt: on

P, Q, J, N = StateEncoding.POS_EULER, StateEncoding.POS_QUAT, StateEncoding.JOINT, StateEncoding.NONE
NO_STATE = [None] * 8  # 8 zero columns: the original's proprio for datasets without one
EEF_GRIP = ["eef_state", None, "gripper_state"]


def _reg(
    name,
    primary=None,
    secondary=None,
    wrist=None,
    *,
    state,
    se=P,
    ae=ActionEncoding.EEF_POS,
    depth=(None, None, None),
    chunk_filter=None,
):
    register_dataset(
        name,
        standardize=STANDARDIZE[name],
        image_keys=dict(primary=primary, secondary=secondary, wrist=wrist),
        depth_keys=dict(primary=depth[0], secondary=depth[1], wrist=depth[2]),
        state_keys=state,
        state_encoding=se,
        action_encoding=ae,
        chunk_filter=chunk_filter,
    )


# fmt: off
_reg("fractal20220817_data", "image", state=["base_pose_tool_reached", "gripper_closed"], se=Q)
_reg("kuka", "image", state=["clip_function_input/base_pose_tool_reached", "gripper_closed"], se=Q)
_reg("bridge_oxe", "image", "image_1", state=["EEF_state", None, "gripper_state"])  # no image_1 in it: as upstream
_reg("bridge_orig", "image_0", "image_1", state=["EEF_state", None, "gripper_state"])
_reg("bridge_dataset", "image_0", "image_1", state=["EEF_state", None, "gripper_state"])
_reg("taco_play", "rgb_static", None, "rgb_gripper", state=["state_eef", None, "state_gripper"],
     depth=("depth_static", None, "depth_gripper"))
_reg("jaco_play", "image", None, "image_wrist", state=["state_eef", None, "state_gripper"])
_reg("berkeley_cable_routing", "image", "top_image", "wrist45_image", state=["robot_state", None], se=J)
_reg("roboturk", "front_rgb", state=NO_STATE, se=N)
_reg("nyu_door_opening_surprising_effectiveness", None, None, "image", state=NO_STATE, se=N)
_reg("viola", "agentview_rgb", None, "eye_in_hand_rgb", state=["joint_states", "gripper_states"], se=J)
_reg("berkeley_autolab_ur5", "image", None, "hand_image", state=["state"], se=Q, depth=("depth", None, None))
_reg("toto", "image", state=["state", None], se=J)
_reg("language_table", "rgb", state=["effector_translation"] + [None] * 6)
_reg("columbia_cairlab_pusht_real", "image", None, "wrist_image", state=["robot_state"] + [None] * 6)
_reg("stanford_kuka_multimodal_dataset" + _EXT, "image", state=["ee_position", "ee_orientation", None], se=Q,
     depth=("depth_image", None, None))
_reg("nyu_rot_dataset" + _EXT, "image", state=EEF_GRIP)
_reg("stanford_hydra_dataset" + _EXT, "image", None, "wrist_image", state=EEF_GRIP)
_reg("austin_buds_dataset" + _EXT, "image", None, "wrist_image", state=["state"], se=J)
_reg("nyu_franka_play_dataset" + _EXT, "image", "image_additional_view", state=["eef_state", None, None],
     depth=("depth", "depth_additional_view", None))
_reg("maniskill_dataset" + _EXT, "image", None, "wrist_image", state=["tcp_pose", "gripper_state"], se=Q,
     depth=("depth", None, "wrist_depth"))
_reg("furniture_bench_dataset" + _EXT, "image", None, "wrist_image", state=["state"], se=Q)
_reg("cmu_franka_exploration_dataset" + _EXT, "highres_image", state=NO_STATE, se=N)
_reg("ucsd_kitchen_dataset" + _EXT, "image", state=["joint_state", None], se=J)
_reg("ucsd_pick_and_place_dataset" + _EXT, "image", state=EEF_GRIP)
_reg("austin_sailor_dataset" + _EXT, "image", None, "wrist_image", state=["state"], se=Q)
_reg("austin_sirius_dataset" + _EXT, "image", None, "wrist_image", state=["state"], se=Q)
_reg("bc_z", "image", state=["present/xyz", "present/axis_angle", None, "present/sensed_close"])
_reg("utokyo_pr2_opening_fridge" + _EXT, "image", state=EEF_GRIP)
_reg("utokyo_pr2_tabletop_manipulation" + _EXT, "image", state=EEF_GRIP)
_reg("utokyo_xarm_pick_and_place" + _EXT, "image", "image2", "hand_image", state=["end_effector_pose", None, None])
_reg("utokyo_xarm_bimanual" + _EXT, "image", state=["pose_r", None, None])
_reg("robo_net", "image", "image1", state=EEF_GRIP)
_reg("berkeley_mvp" + _EXT, None, None, "hand_image", state=["pose", "gripper"], se=Q, ae=ActionEncoding.JOINT_POS)
_reg("berkeley_rpt" + _EXT, None, None, "hand_image", state=["joint_pos", "gripper"], se=J,
     ae=ActionEncoding.JOINT_POS)
_reg("kaist_nonprehensile" + _EXT, "image", state=["state", None], se=Q)
_reg("stanford_mask_vit" + _EXT, "image", state=EEF_GRIP)
_reg("tokyo_u_lsmo" + _EXT, "image", state=EEF_GRIP)
_reg("dlr_sara_pour" + _EXT, "image", state=["state", None, None])
_reg("dlr_sara_grid_clamp" + _EXT, "image", state=["state", None, None])
_reg("dlr_edan_shared_control" + _EXT, "image", state=["state", None])
_reg("asu_table_top" + _EXT, "image", state=EEF_GRIP)
_reg("stanford_robocook" + _EXT, "image_1", "image_2", state=EEF_GRIP, depth=("depth_1", "depth_2", None))
_reg("imperialcollege_sawyer_wrist_cam", "image", None, "wrist_image", state=[None] * 7 + ["state"], se=N)
_reg("iamlab_cmu_pickup_insert" + _EXT, "image", None, "wrist_image", state=["joint_state", "gripper_state"], se=J)
_reg("uiuc_d3field", "image_1", "image_2", state=NO_STATE, se=N, depth=("depth_1", "depth_2", None))
_reg("utaustin_mutex", "image", None, "wrist_image", state=["state"], se=J)
_reg("berkeley_fanuc_manipulation", "image", None, "wrist_image", state=["joint_state", None, "gripper_state"], se=J)
_reg("cmu_playing_with_food", "image", None, "finger_vision_1", state=["state", None, None])
_reg("cmu_play_fusion", "image", state=["state"], se=J)
_reg("cmu_stretch", "image", state=EEF_GRIP)
for _gnm in ("berkeley_gnm_recon", "berkeley_gnm_cory_hall", "berkeley_gnm_sac_son"):
    _reg(_gnm, None, None, "image", state=["state", None, None])
_reg("droid", "exterior_image_1_left", "exterior_image_2_left", "wrist_image_left", state=["proprio"], se=Q,
     chunk_filter=D.zero_action_filter)
_reg("fmb_dataset", "image_side_1", "image_side_2", "image_wrist_1", state=["proprio"],
     depth=("image_side_1_depth", "image_side_2_depth", "image_wrist_1_depth"))
_reg("dobbe", "wrist_image", state=["proprio"])
_reg("roboset", "image_left", "image_right", "image_wrist", state=["proprio"], se=J, ae=ActionEncoding.JOINT_POS)
_reg("rh20t", "image_front", "image_side_right", "image_wrist", state=["proprio"])
for _task in TDROID:
    _reg(_task, "static_image", state=["EEF_state", None, "gripper_state"], depth=("static_depth_image", None, None))
_reg("droid_wipe", "exterior_image_2_left", None, "wrist_image_left", state=["proprio"])
for _suite in LIBERO:
    _reg(_suite, "image", None, "wrist_image", state=["EEF_state", "gripper_state"])
_reg("demo_tabletop", "image", state=["state"])
# fmt: on
