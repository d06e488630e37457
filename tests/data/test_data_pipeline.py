"""Mixture proportions, host sharding, determinism, augmentation on/off, labels of model batches."""

import dataclasses

import numpy as np
import tensorflow as tf

from openvla_jax.data.rlds import RLDSPipeline
from openvla_jax.data.traj import TrajDataset, open_builder
from openvla_jax.models.preprocess import FUSED_MEAN, FUSED_STD
from openvla_jax.tokenizer.actions import ActionTokenizer
from tests.support.rlds_fixtures import make_cfg

GOAL = "libero_goal_no_noops"


def take(pipe, n):
    return [b for _, b in zip(range(n), pipe)]


def test_mixture_samples_in_stated_proportions(rlds):
    cfg = make_cfg(
        rlds,
        mixture=[("bridge_orig", 3.0), ("libero_spatial_no_noops", 1.0)],
        balance_weights=False,
        batch_size=16,
        shuffle_buffer=1,
    )
    pipe = RLDSPipeline(cfg, rlds.tok)
    names = np.concatenate([b["dataset_name"] for b in take(pipe, 30)])
    frac = np.mean(names == "bridge_orig")
    sigma = np.sqrt(0.75 * 0.25 / len(names))
    assert abs(frac - 0.75) < 4 * sigma, frac
    # balanced: weight x transitions (bridge loses its first and last steps to standardize)
    bal = RLDSPipeline(make_cfg(rlds, mixture=cfg.mixture), rlds.tok)
    n_b = sum(len(e["action"]) - 2 for e in rlds.raw["bridge_orig"])
    n_l = sum(len(e["action"]) for e in rlds.raw["libero_spatial_no_noops"])
    assert np.isclose(bal.sample_weights["bridge_orig"], 3 * n_b / (3 * n_b + n_l))


def test_host_shards_disjoint_and_covering(rlds):
    builder = open_builder(GOAL, rlds.dir)
    shards = []
    for i in range(2):
        ds = TrajDataset.from_rlds(builder, "train", shuffle=False, process_index=i, process_count=2)
        shards.append([t["traj_metadata"]["file_path"][0].numpy().decode() for t in ds.ds])
    a, b = set(shards[0]), set(shards[1])
    assert not a & b
    assert a | b == {f"/libero/{e}" for e in range(24)}
    assert len(shards[0]) == len(a) == 12
    host = RLDSPipeline(make_cfg(rlds, mixture=GOAL, process_index=1, process_count=2), rlds.tok)
    assert next(iter(host))["input_ids"].shape[0] == 4  # this host's slice of the global batch 8


def test_same_seed_same_batches(rlds):
    mix = [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)]
    runs = [take(RLDSPipeline(make_cfg(rlds, mixture=mix, augment=True, seed=s), rlds.tok), 3) for s in (3, 3, 4)]
    for b1, b2 in zip(runs[0], runs[1]):
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)
    assert any(not np.array_equal(b1["pixel_values"], b3["pixel_values"]) for b1, b3 in zip(runs[0], runs[2]))


def test_augmentation_in_range_and_off_at_eval(rlds):
    lo, hi = (0 - FUSED_MEAN) / FUSED_STD, (1 - FUSED_MEAN) / FUSED_STD
    on = take(RLDSPipeline(make_cfg(rlds, mixture=GOAL, augment=True), rlds.tok), 2)
    off = take(RLDSPipeline(make_cfg(rlds, mixture=GOAL, augment=False), rlds.tok), 2)
    for a, b in zip(on, off):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])  # same frames, same order
        assert not np.allclose(a["pixel_values"], b["pixel_values"])
        for x in (a["pixel_values"], b["pixel_values"]):
            assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()

    ev_aug = take(RLDSPipeline(make_cfg(rlds, mixture=GOAL, train=False, augment=True, batch_size=2), rlds.tok), 1)[0]
    ev = take(RLDSPipeline(make_cfg(rlds, mixture=GOAL, train=False, batch_size=2), rlds.tok), 1)[0]
    np.testing.assert_array_equal(ev_aug["pixel_values"], ev["pixel_values"])
    # independent reference: tfds's own image decoding of the first eval frame, lanczos3, normalise
    ep = next(iter(open_builder(GOAL, rlds.dir).as_dataset(split="train[95%:]")))
    img = next(iter(ep["steps"]))["observation"]["image"]
    ref = tf.image.resize(tf.cast(img, tf.float32), (32, 32), "lanczos3", antialias=True).numpy()
    ref = np.clip(np.round(ref), 0, 255) / 255.0
    ref = (np.concatenate([ref, ref], -1) - FUSED_MEAN) / FUSED_STD
    np.testing.assert_allclose(ev["pixel_values"][0], ref, atol=1e-5)


def test_labels_eight_supervised_and_decode_to_action(rlds):
    mix = [("bridge_orig", 1.0), ("fractal20220817_data", 1.0), ("libero_spatial_no_noops", 1.0)]
    pipe = RLDSPipeline(make_cfg(rlds, mixture=mix, seq_bucket=16), rlds.tok)
    at = ActionTokenizer(vocab_size=rlds.tok.sp_vocab_size)
    for batch in take(pipe, 3):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape[1] % 16 == 0 and ids.dtype == np.int32
        sup = labels != -100
        assert (sup.sum(1) == 8).all()
        for i in range(len(ids)):
            pos = np.nonzero(sup[i])[0]
            assert (np.diff(pos) == 1).all() and ids[i, pos[-1]] == rlds.tok.eos_id
            assert mask[i, : pos[-1] + 1].all() and not mask[i, pos[-1] + 1 :].any()
            assert (ids[i, pos[-1] + 1 :] == rlds.tok.pad_id).all()
            assert ids[i, 0] == rlds.tok.bos_id and ids[i, pos[0] - 1] == rlds.tok.space_id
            err = np.abs(at.decode(labels[i, pos[:7]]) - batch["action"][i, 0])
            assert err.max() <= at.bin_width / 2 + 1e-6


def test_action_chunks_supervise_all_future_actions(rlds):
    cfg = make_cfg(rlds, mixture="libero_spatial_no_noops", future_action_window_size=2, batch_size=4, ram_budget_gb=1)
    batch = next(iter(RLDSPipeline(cfg, rlds.tok)))
    at = ActionTokenizer(vocab_size=rlds.tok.sp_vocab_size)
    assert batch["action"].shape == (4, 3, 7)
    sup = batch["labels"] != -100
    assert (sup.sum(1) == 3 * 7 + 1).all()
    for i in range(4):
        ids = batch["labels"][i, sup[i]][:-1].reshape(3, 7)
        assert np.abs(at.decode(ids) - batch["action"][i]).max() <= at.bin_width / 2 + 1e-6


def test_uint8_pixels_are_the_float_batches_before_normalisation(rlds):
    from openvla_jax.models.preprocess import normalize_uint8

    cfg = make_cfg(rlds, mixture=GOAL, augment=True)
    floats = next(iter(RLDSPipeline(cfg, rlds.tok)))
    raw = next(iter(RLDSPipeline(dataclasses.replace(cfg, pixels="uint8"), rlds.tok)))
    assert raw["pixel_values"].dtype == np.uint8 and raw["pixel_values"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(raw["input_ids"], floats["input_ids"])  # the same frames, in order
    np.testing.assert_allclose(normalize_uint8(raw["pixel_values"]), floats["pixel_values"], rtol=0, atol=1e-6)
