"""Tiny bridge_orig / fractal / LIBERO datasets in the real tfds format through standardize and the
full pipeline; actions compared with a NumPy computation of each dataset's convention."""

import numpy as np

from openvla_jax.data import normalize as N
from openvla_jax.data.oxe import get_dataset_config
from openvla_jax.data.rlds import RLDSPipeline, make_standardize
from openvla_jax.data.traj import TrajDataset, open_builder
from tests.data.test_data_transforms import np_binarize, np_rel2abs
from tests.support.rlds_fixtures import make_cfg


def np_standardized(name, raw):
    """Per-episode (action [T', 7], proprio [T', P]) by the documented conventions."""
    out = []
    for ep in raw:
        if name == "bridge_orig":  # drop step 0, binarize gripper, relabel from state deltas
            a, s = ep["action"][1:], ep["state"][1:]
            g = np_binarize(a[:, 6])
            act = np.concatenate([s[1:, :6] - s[:-1, :6], g[:-1, None]], 1)
            prop = np.concatenate([s[:-1, :6], np.zeros((len(s) - 1, 1)), s[:-1, -1:]], 1)
        elif name == "fractal20220817_data":  # relative gripper -> absolute
            act = np.concatenate([ep["world_vector"], ep["rotation_delta"], np_rel2abs(ep["gripper"])[:, None]], 1)
            prop = np.concatenate([ep["pose"], ep["closed"]], 1)
        else:  # LIBERO: -1 open / +1 close -> 1 - clip(g, 0, 1)
            a, s = ep["action"], ep["state"]
            act = np.concatenate([a[:, :6], 1 - np.clip(a[:, 6:], 0, 1)], 1)
            prop = np.concatenate([s[:, :6], s[:, -2:]], 1)
        out.append((act.astype(np.float32), prop.astype(np.float32)))
    return out


def read_standardized(rlds, name):
    builder = open_builder(name, rlds.dir)
    std = make_standardize(name, get_dataset_config(name), "primary", [])
    ds = TrajDataset.from_rlds(builder, "train", shuffle=False, deterministic=True).traj_map(std)
    return [
        (t["action"].numpy(), t["observation"]["proprio"].numpy(), t["task"]["language_instruction"].numpy())
        for t in ds.ds
    ]


def test_bridge_folder_with_other_builder_name_and_catalog_name_load_offline(rlds):
    assert open_builder("bridge_orig", rlds.dir).name == "bridge_dataset"
    assert open_builder("fractal20220817_data", rlds.dir).info.version == "0.1.0"
    assert open_builder(f"{rlds.dir}/libero_spatial_no_noops/1.0.0", None).name == "libero_spatial_no_noops"


def test_standardized_actions_equal_numpy_conventions(rlds):
    for name in ("bridge_orig", "fractal20220817_data", "libero_spatial_no_noops"):
        got = read_standardized(rlds, name)
        want = np_standardized(name, rlds.raw[name])
        assert len(got) == len(want)
        for (a, p, lang), (wa, wp), ep in zip(got, want, rlds.raw[name]):
            np.testing.assert_allclose(a, wa, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(p, wp, atol=1e-6, err_msg=name)
            assert set(lang.tolist()) == {ep["instruction"].encode()}


def test_pipeline_actions_are_normalized_numpy_actions(rlds):
    """Every frame out of the full pipeline carries one of NumPy's normalised standardized actions."""
    names = ["bridge_orig", "fractal20220817_data", "libero_spatial_no_noops"]
    pipe = RLDSPipeline(make_cfg(rlds, mixture=[(n, 1.0) for n in names]), rlds.tok)
    want = {}
    for n in names:
        acts = np.concatenate([a for a, _ in np_standardized(n, rlds.raw[n])])
        mask = get_dataset_config(n).action_mask
        want[n] = N.normalize(acts, pipe.statistics[n]["action"], N.BOUNDS_Q99, mask=mask)
    seen = set()
    for _, batch in zip(range(6), pipe):
        for name, act in zip(batch["dataset_name"], batch["action"][:, 0]):
            assert np.abs(want[name] - act).max(1).min() < 1e-5, name
            seen.add(name)
        assert batch["pixel_values"].shape == (8, 32, 32, 6)
    assert seen == set(names)
