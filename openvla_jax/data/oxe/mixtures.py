"""Named dataset mixtures: lists of (dataset, sampling weight), as in the OpenVLA release.

With weight balancing on, a dataset's sampling probability is proportional to weight x its number
of transitions.
"""

from __future__ import annotations

_EXT = "_converted_externally_to_rlds"

_SOUP_CORE = [
    ("kuka", 0.8341046294),
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
    ("bc_z", 0.2),
    ("fmb_dataset", 1.0),
    ("dobbe", 0.2),
]

_LIBERO = ["libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops",
           "libero_10_no_noops"]

MIXTURES: dict[str, list[tuple[str, float]]] = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    # The OpenVLA-7B pretraining mixture (25 datasets).
    "oxe_magic_soup_plus_minus": [("fractal20220817_data", 1.0)] + _SOUP_CORE + _SOUP_TAIL,
    "oxe_magic_soup_plus": ([("fractal20220817_data", 0.54087122203)] + _SOUP_CORE
                            + [("language_table", 0.1)] + _SOUP_TAIL + [("droid", 0.06)]),
    "droid": [("droid", 1.0)],
    **{suite: [(suite, 1.0)] for suite in _LIBERO},
    "libero_mix": [(suite, 1.0) for suite in _LIBERO],
}


def get_mixture(name_or_list) -> list[tuple[str, float]]:
    """A mixture by name, a single dataset name (weight 1), or an explicit [(name, weight)] list."""
    if isinstance(name_or_list, str):
        if name_or_list in MIXTURES:
            return list(MIXTURES[name_or_list])
        return [(name_or_list, 1.0)]
    out = [(str(n), float(w)) for n, w in name_or_list]
    if not out:
        raise ValueError("empty mixture")
    return out
