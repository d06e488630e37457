"""Named dataset mixtures: lists of (dataset, sampling weight), as in the OpenVLA release, plus ours.

With weight balancing on, a dataset's sampling probability is proportional to weight x its number
of transitions. A mixture may name a dataset twice (the original's `rtx_franka` does): `get_mixture`
keeps the first entry, as the original loader does.
"""

from __future__ import annotations

import logging

from openvla_jax.data.oxe.datasets import LIBERO, TDROID

_EXT = "_converted_externally_to_rlds"
log = logging.getLogger(__name__)

_RT1 = ("fractal20220817_data", 0.54087122203)
_KUKA = ("kuka", 0.8341046294)

# RT-X: the first ten datasets of the Open X-Embodiment release.
_RTX = [
    _RT1,
    _KUKA,
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 2.0),
    ("berkeley_cable_routing", 3.0),
    ("roboturk", 1.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 1.0),
    ("toto", 1.0),
]
_RTX_FRANKA_EXTRA = [  # the first four repeat RT-X entries: ignored by get_mixture, as upstream
    ("taco_play", 1.0),
    ("berkeley_cable_routing", 1.0),
    ("viola", 1.0),
    ("toto", 1.0),
    ("stanford_hydra_dataset" + _EXT, 1.0),
    ("austin_buds_dataset" + _EXT, 3.0),
    ("nyu_franka_play_dataset" + _EXT, 3.0),
    ("maniskill_dataset" + _EXT, 0.1),
    ("furniture_bench_dataset" + _EXT, 0.1),
    ("cmu_franka_exploration_dataset" + _EXT, 5.0),
    ("austin_sailor_dataset" + _EXT, 1.0),
    ("austin_sirius_dataset" + _EXT, 1.0),
    ("berkeley_rpt" + _EXT, 1.0),  # JOINT_POS: not loadable, see loadable_mixture
    ("kaist_nonprehensile" + _EXT, 3.0),
    ("stanford_robocook" + _EXT, 1.0),
    ("iamlab_cmu_pickup_insert" + _EXT, 1.0),
    ("utaustin_mutex", 1.0),
    ("cmu_play_fusion", 1.0),
]

# The Magic Soup core: RT-X's datasets with the soup's weights.
_SOUP_CORE = [
    _KUKA,
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 1.0),
    ("berkeley_cable_routing", 1.0),
    ("roboturk", 2.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 2.0),
    ("toto", 1.0),
]
_SOUP_TAIL = [
    ("stanford_hydra_dataset" + _EXT, 2.0),
    ("austin_buds_dataset" + _EXT, 1.0),
    ("nyu_franka_play_dataset" + _EXT, 3.0),
    ("furniture_bench_dataset" + _EXT, 0.1),
    ("ucsd_kitchen_dataset" + _EXT, 2.0),
    ("austin_sailor_dataset" + _EXT, 1.0),
    ("austin_sirius_dataset" + _EXT, 1.0),
    ("dlr_edan_shared_control" + _EXT, 1.0),
    ("iamlab_cmu_pickup_insert" + _EXT, 1.0),
    ("utaustin_mutex", 1.0),
    ("berkeley_fanuc_manipulation", 2.0),
    ("cmu_stretch", 1.0),
]
_SOUP_PLUS_NEW = [("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2)]  # bc_z: v0.1.0, later ones broken

MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": list(_RTX),
    "rtx_franka": _RTX + _RTX_FRANKA_EXTRA,
    "oxe_magic_soup": [_RT1] + _SOUP_CORE + [("language_table", 0.1)] + _SOUP_TAIL,
    "oxe_magic_soup_plus": [_RT1]
    + _SOUP_CORE
    + [("language_table", 0.1)]
    + _SOUP_TAIL
    + _SOUP_PLUS_NEW
    + [("droid", 0.06)],
    # The OpenVLA-7B pretraining mixture (25 datasets): RT-1 at full weight, no language_table / droid.
    "oxe_magic_soup_plus_minus": [("fractal20220817_data", 1.0)] + _SOUP_CORE + _SOUP_TAIL + _SOUP_PLUS_NEW,
    **{task: [(task, 1.0)] for task in TDROID},
    "droid_wipe": [("droid_wipe", 1.0)],
    **{suite: [(suite, 1.0)] for suite in LIBERO},
    # Ours.
    "droid": [("droid", 1.0)],
    "libero_mix": [(suite, 1.0) for suite in LIBERO],
}


def get_mixture(name_or_list) -> list[tuple[str, float]]:
    """A mixture by name, a single dataset name (weight 1), or an explicit [(name, weight)] list;
    a dataset named twice keeps its first weight (logged)."""
    if isinstance(name_or_list, str):
        entries = MIXTURES.get(name_or_list, [(name_or_list, 1.0)])
    else:
        entries = [(str(n), float(w)) for n, w in name_or_list]
    if not entries:
        raise ValueError("empty mixture")
    out, seen = [], set()
    for name, weight in entries:
        if name in seen:
            log.warning("mixture %r names %r twice: keeping its first weight", name_or_list, name)
            continue
        seen.add(name)
        out.append((name, float(weight)))
    return out


def loadable_mixture(name_or_list) -> tuple[list[tuple[str, float]], dict[str, str]]:
    """`get_mixture` without the datasets OpenVLA can't train on -> (kept, {skipped name: why}).

    The original loader skips such datasets with a warning (e.g. `berkeley_rpt` in `rtx_franka`).
    """
    from openvla_jax.data.oxe.configs import check_loadable, get_dataset_config

    kept, skipped = [], {}
    for name, weight in get_mixture(name_or_list):
        try:
            check_loadable(get_dataset_config(name))
        except ValueError as e:
            skipped[name] = str(e)
            continue
        kept.append((name, weight))
    return kept, skipped
