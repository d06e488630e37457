"""Per-dataset configuration for Open X-Embodiment / LIBERO RLDS datasets, and the registry.

A `DatasetConfig` says, for one RLDS dataset: which observation keys are the primary / secondary /
wrist cameras (and depth images), which keys concatenate into the proprio vector (None = one zero
column), the state and action encodings (the action encoding decides which action dims are
normalised and which are absolute), the standardize function (`transforms*.py`, `droid.py`) that
brings its actions to the common convention, and an optional per-frame filter for after chunking.
The datasets themselves are registered in `datasets.py`.

Register your own dataset in a few lines:

    from openvla_jax.data.oxe import register_dataset, transforms
    register_dataset("my_robot", image_keys={"primary": "image", "wrist": "wrist_image"},
                     state_keys=["eef_state", None, "gripper_state"],
                     standardize=transforms.identity)       # or your own fn(traj) -> traj
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from typing import Callable, Mapping, Sequence

import tensorflow as tf

CAMERAS = ("primary", "secondary", "wrist")


class StateEncoding(enum.IntEnum):
    NONE = -1  # no proprio
    POS_EULER = 1  # EEF xyz (3) + roll-pitch-yaw (3) + pad (1) + gripper (1)
    POS_QUAT = 2  # EEF xyz (3) + quaternion (4) + gripper (1)
    JOINT = 3  # joint angles (7, padded) + gripper (1)
    JOINT_BIMANUAL = 4  # 2 x [joint angles (6) + gripper (1)]


class ActionEncoding(enum.IntEnum):
    EEF_POS = 1  # EEF delta xyz (3) + delta roll-pitch-yaw (3) + gripper (1)
    JOINT_POS = 2  # joint deltas (7) + gripper (1)
    JOINT_POS_BIMANUAL = 3  # 2 x [joint deltas (6) + gripper (1)]
    EEF_R6 = 4  # EEF delta xyz (3) + rotation as R6 (6) + gripper (1)


# Per arm: (relative dims, then one absolute gripper dim); bimanual repeats it for the second arm.
_ARM_LAYOUT = {
    ActionEncoding.EEF_POS: (6, 1),
    ActionEncoding.JOINT_POS: (7, 1),
    ActionEncoding.JOINT_POS_BIMANUAL: (6, 2),
    ActionEncoding.EEF_R6: (9, 1),
}
# OpenVLA trains only on these (the original's make_oxe_dataset_kwargs raises for the others).
LOADABLE_ENCODINGS = (ActionEncoding.EEF_POS, ActionEncoding.EEF_R6)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    name: str
    standardize: Callable[[dict], dict]
    image_keys: Mapping[str, str | None]
    state_keys: Sequence[str | None] = ()
    state_encoding: StateEncoding = StateEncoding.POS_EULER
    action_encoding: ActionEncoding = ActionEncoding.EEF_POS
    language_key: str = "language_instruction"
    depth_keys: Mapping[str, str | None] = dataclasses.field(default_factory=lambda: dict.fromkeys(CAMERAS))
    # Frame predicate (frame dict, `action` `[K, A]` normalised) -> scalar bool tf.Tensor, True = keep.
    # Applied after chunking + flattening, before interleaving (the original's chunk_filter_fn).
    chunk_filter: Callable[[dict], tf.Tensor] | None = None

    @property
    def action_dim(self) -> int:
        """Width A of the standardized `action` `[T, A]` this encoding promises."""
        relative, arms = _ARM_LAYOUT[self.action_encoding]
        return (relative + 1) * arms

    @property
    def action_mask(self) -> list[bool]:
        """`[A]` dims that get normalised: all but the absolute gripper command(s)."""
        relative, arms = _ARM_LAYOUT[self.action_encoding]
        return ([True] * relative + [False]) * arms

    @property
    def absolute_action_mask(self) -> list[bool]:
        """`[A]` dims that are absolute targets (the grippers), the complement of `action_mask`."""
        return [not m for m in self.action_mask]

    @property
    def loadable(self) -> bool:
        """Whether OpenVLA can train on it (EEF_POS / EEF_R6 actions); see `check_loadable`."""
        return self.action_encoding in LOADABLE_ENCODINGS

    def describe(self) -> str:
        """Stable text of everything that changes the standardized output (hashed for caching)."""
        text = (
            f"{self.name}|{dict(self.image_keys)}|{list(self.state_keys)}|{int(self.state_encoding)}|"
            f"{int(self.action_encoding)}|{self.language_key}|{_source(self.standardize)}"
        )
        # Only when set, so the hashes (and cached statistics) of filter-free datasets stay as they were.
        return text if self.chunk_filter is None else f"{text}|chunk_filter={_source(self.chunk_filter)}"


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return repr(fn)


def check_loadable(cfg: DatasetConfig) -> DatasetConfig:
    """`cfg` unchanged, or ValueError naming the dataset and its action encoding if OpenVLA can't train on it."""
    if not cfg.loadable:
        ok = ", ".join(e.name for e in LOADABLE_ENCODINGS)
        raise ValueError(
            f"cannot load dataset {cfg.name!r}: its action encoding is {cfg.action_encoding.name}, "
            f"and OpenVLA trains only on {ok} actions (drop it from the mixture)"
        )
    return cfg


REGISTRY: dict[str, DatasetConfig] = {}


def register_dataset(
    name: str,
    *,
    standardize: Callable[[dict], dict],
    image_keys: Mapping[str, str | None],
    state_keys: Sequence[str | None] = (),
    state_encoding: StateEncoding = StateEncoding.POS_EULER,
    action_encoding: ActionEncoding = ActionEncoding.EEF_POS,
    language_key: str = "language_instruction",
    depth_keys: Mapping[str, str | None] | None = None,
    chunk_filter: Callable[[dict], tf.Tensor] | None = None,
    overwrite: bool = True,
) -> DatasetConfig:
    """Add (or replace) a dataset; `name` is the folder name under the data dir. Cameras missing
    from `image_keys` / `depth_keys` among primary / secondary / wrist are None (other names are kept)."""
    if name in REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered")
    cfg = DatasetConfig(
        name,
        standardize,
        {**dict.fromkeys(CAMERAS), **dict(image_keys)},
        tuple(state_keys),
        state_encoding,
        action_encoding,
        language_key,
        {**dict.fromkeys(CAMERAS), **dict(depth_keys or {})},
        chunk_filter,
    )
    REGISTRY[name] = cfg
    return cfg


def get_dataset_config(name: str) -> DatasetConfig:
    if name not in REGISTRY:
        raise KeyError(
            f"no config registered for dataset {name!r}; register it with "
            f"openvla_jax.data.oxe.register_dataset(...). Known: {sorted(REGISTRY)}"
        )
    return REGISTRY[name]
