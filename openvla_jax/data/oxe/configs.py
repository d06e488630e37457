"""Per-dataset configuration for Open X-Embodiment / LIBERO RLDS datasets, and the registry.

A `DatasetConfig` says, for one RLDS dataset: which observation keys are the primary / secondary /
wrist cameras, which keys concatenate into the proprio vector (None = one zero column), the state
and action encodings (the action encoding decides the normalisation mask), and the standardize
function (`transforms.py`) that brings its actions to the common 7-dim convention.

Register your own dataset in a few lines:

    from openvla_jax.data.oxe import register_dataset, transforms
    register_dataset("my_robot", image_keys={"primary": "image", "wrist": "wrist_image"},
                     state_keys=["eef_state", None, "gripper_state"],
                     standardize=transforms.identity)       # or your own fn(traj) -> traj
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping, Sequence

from openvla_jax.data.oxe import transforms as T


class StateEncoding(enum.IntEnum):
    NONE = -1       # no proprio
    POS_EULER = 1   # EEF xyz (3) + roll-pitch-yaw (3) + pad (1) + gripper (1)
    POS_QUAT = 2    # EEF xyz (3) + quaternion (4) + gripper (1)
    JOINT = 3       # joint angles (7, padded) + gripper (1)


class ActionEncoding(enum.IntEnum):
    EEF_POS = 1     # EEF delta xyz (3) + delta roll-pitch-yaw (3) + gripper (1)
    JOINT_POS = 2   # joint deltas (7) + gripper (1)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    name: str
    standardize: Callable[[dict], dict]
    image_keys: Mapping[str, str | None]
    state_keys: Sequence[str | None] = ()
    state_encoding: StateEncoding = StateEncoding.POS_EULER
    action_encoding: ActionEncoding = ActionEncoding.EEF_POS
    language_key: str = "language_instruction"

    @property
    def action_mask(self) -> list[bool]:
        """Dims that get normalised: all but the absolute gripper command."""
        n = 7 if self.action_encoding == ActionEncoding.EEF_POS else 8
        return [True] * (n - 1) + [False]

    def describe(self) -> str:
        """Stable text of everything that changes the standardized output (hashed for caching)."""
        import inspect

        try:
            src = inspect.getsource(self.standardize)
        except (OSError, TypeError):
            src = repr(self.standardize)
        return (f"{self.name}|{dict(self.image_keys)}|{list(self.state_keys)}|{int(self.state_encoding)}|"
                f"{int(self.action_encoding)}|{self.language_key}|{src}")


REGISTRY: dict[str, DatasetConfig] = {}


def register_dataset(name: str, *, standardize: Callable[[dict], dict],
                     image_keys: Mapping[str, str | None], state_keys: Sequence[str | None] = (),
                     state_encoding: StateEncoding = StateEncoding.POS_EULER,
                     action_encoding: ActionEncoding = ActionEncoding.EEF_POS,
                     language_key: str = "language_instruction", overwrite: bool = True) -> DatasetConfig:
    """Add (or replace) a dataset; `name` is the folder name under the data dir."""
    if name in REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered")
    keys = {"primary": None, "secondary": None, "wrist": None, **dict(image_keys)}
    cfg = DatasetConfig(name, standardize, keys, tuple(state_keys), state_encoding, action_encoding,
                        language_key)
    REGISTRY[name] = cfg
    return cfg


def get_dataset_config(name: str) -> DatasetConfig:
    if name not in REGISTRY:
        raise KeyError(f"no config registered for dataset {name!r}; register it with "
                       f"openvla_jax.data.oxe.register_dataset(...). Known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _reg(name, standardize, primary=None, secondary=None, wrist=None, state=(),
         se=StateEncoding.POS_EULER, ae=ActionEncoding.EEF_POS):
    register_dataset(name, standardize=standardize, state_keys=state, state_encoding=se,
                     action_encoding=ae, image_keys={"primary": primary, "secondary": secondary,
                                                     "wrist": wrist})


P, Q, J, N = StateEncoding.POS_EULER, StateEncoding.POS_QUAT, StateEncoding.JOINT, StateEncoding.NONE
_ext = "_converted_externally_to_rlds"

# fmt: off
_reg("fractal20220817_data", T.rt1, "image", state=["base_pose_tool_reached", "gripper_closed"], se=Q)
_reg("kuka", T.kuka, "image", state=["clip_function_input/base_pose_tool_reached", "gripper_closed"], se=Q)
_reg("bridge_orig", T.bridge_orig, "image_0", "image_1", state=["EEF_state", None, "gripper_state"])
_reg("bridge_dataset", T.bridge_orig, "image_0", "image_1", state=["EEF_state", None, "gripper_state"])
_reg("taco_play", T.taco_play, "rgb_static", wrist="rgb_gripper", state=["state_eef", None, "state_gripper"])
_reg("jaco_play", T.jaco_play, "image", wrist="image_wrist", state=["state_eef", None, "state_gripper"])
_reg("berkeley_cable_routing", T.berkeley_cable_routing, "image", "top_image", "wrist45_image",
     state=["robot_state", None], se=J)
_reg("roboturk", T.roboturk, "front_rgb", se=N)
_reg("viola", T.viola, "agentview_rgb", wrist="eye_in_hand_rgb", state=["joint_states", "gripper_states"], se=J)
_reg("berkeley_autolab_ur5", T.berkeley_autolab_ur5, "image", wrist="hand_image", state=["state"], se=Q)
_reg("toto", T.toto, "image", state=["state", None], se=J)
_reg("language_table", T.language_table, "rgb", state=["effector_translation", None, None, None, None, None, None])
_reg("stanford_hydra_dataset" + _ext, T.stanford_hydra, "image", wrist="wrist_image",
     state=["eef_state", None, "gripper_state"])
_reg("austin_buds_dataset" + _ext, T.austin_buds, "image", wrist="wrist_image", state=["state"], se=J)
_reg("nyu_franka_play_dataset" + _ext, T.nyu_franka_play, "image", "image_additional_view",
     state=["eef_state", None, None])
_reg("furniture_bench_dataset" + _ext, T.furniture_bench, "image", wrist="wrist_image", state=["state"], se=Q)
_reg("ucsd_kitchen_dataset" + _ext, T.ucsd_kitchen, "image", state=["joint_state", None], se=J)
_reg("austin_sailor_dataset" + _ext, T.austin_sailor, "image", wrist="wrist_image", state=["state"], se=Q)
_reg("austin_sirius_dataset" + _ext, T.austin_sirius, "image", wrist="wrist_image", state=["state"], se=Q)
_reg("dlr_edan_shared_control" + _ext, T.dlr_edan_shared_control, "image", state=["state", None])
_reg("iamlab_cmu_pickup_insert" + _ext, T.iamlab_cmu_pickup_insert, "image", wrist="wrist_image",
     state=["joint_state", "gripper_state"], se=J)
_reg("utaustin_mutex", T.utaustin_mutex, "image", wrist="wrist_image", state=["state"], se=J)
_reg("berkeley_fanuc_manipulation", T.berkeley_fanuc, "image", wrist="wrist_image",
     state=["joint_state", None, "gripper_state"], se=J)
_reg("cmu_stretch", T.cmu_stretch, "image", state=["eef_state", None, "gripper_state"])
_reg("bc_z", T.bc_z, "image", state=["present/xyz", "present/axis_angle", None, "present/sensed_close"])
_reg("fmb_dataset", T.fmb, "image_side_1", "image_side_2", "image_wrist_1", state=["proprio"])
_reg("dobbe", T.dobbe, "wrist_image", state=["proprio"])
_reg("droid", T.droid, "exterior_image_1_left", "exterior_image_2_left", "wrist_image_left",
     state=["proprio"], se=Q)
for _suite in ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops",
               "libero_10_no_noops"):
    _reg(_suite, T.libero, "image", wrist="wrist_image", state=["EEF_state", "gripper_state"])
# The bundled demo task (scripts/make_demo_data.py): actions already bridge-style, gripper 1 = open.
_reg("demo_tabletop", T.identity, "image", state=["state"])
# fmt: on
