"""Several cameras, proprioception and action chunks in model batches (the OFT inputs, data side).

References are independent of the pipeline: images decoded from the stored JPEG bytes with PIL
(and exactly with tf.io.decode_jpeg, the original's decoder),
proprio / action statistics and normalisation recomputed with NumPy from the fixture's raw arrays,
chunks indexed by hand (the original's padding past the episode end: relative dims 0, the
absolute gripper repeats its last command).
"""

import io
import types

import numpy as np
import pytest

from openvla_jax.data.prepare import DataError
from openvla_jax.data.rlds import RLDSPipeline
from openvla_jax.models.preprocess import FUSED_MEAN, FUSED_STD
from tests.support.rlds_fixtures import make_cfg, write_libero

NAME = "libero_10_no_noops"  # registered with primary = image, wrist = wrist_image


@pytest.fixture(scope="module")
def views(rlds, tmp_path_factory):
    """A LIBERO dataset whose wrist camera differs from the primary one, and NumPy references."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from PIL import Image

    from openvla_jax.data.traj import open_builder

    d = str(tmp_path_factory.mktemp("views"))
    raw = write_libero(d, name=NAME, n_episodes=4, T=(4, 6), seed=11, distinct_wrist=True)
    # the stored JPEG bytes, decoded with PIL (what the pipeline must reproduce at image_size = 32)
    ds = open_builder(NAME, d).as_dataset(split="train", decoders={"steps": tfds.decode.SkipDecoding()})
    decoded, decoded_tf = {}, {}
    for ep in ds:
        e = int(ep["episode_metadata"]["file_path"].numpy().decode().rsplit("/", 1)[1])
        obs = ep["steps"]["observation"]
        decoded[e] = {
            k: [np.asarray(Image.open(io.BytesIO(b))) for b in obs[k].numpy()] for k in ("image", "wrist_image")
        }
        decoded_tf[e] = {
            k: [tf.io.decode_jpeg(b, channels=3).numpy() for b in obs[k].numpy()] for k in ("image", "wrist_image")
        }

    proprio = [np.concatenate([r["state"][:, :6], r["state"][:, -2:]], 1) for r in raw]
    action = []
    for r in raw:  # LIBERO: gripper -1 open / +1 close -> clip to [0, 1], invert (1 = open)
        a = r["action"].copy()
        a[:, 6] = 1 - np.clip(a[:, 6], 0, 1)
        action.append(a)

    def bounds(xs, mask=None):
        x = np.concatenate(xs).astype(np.float64)
        q01, q99 = np.quantile(x, 0.01, 0), np.quantile(x, 0.99, 0)
        const = x.min(0) == x.max(0)
        m = np.ones(x.shape[1], bool) if mask is None else np.asarray(mask)

        def norm(y):
            out = np.where(m, np.clip(2 * (y - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), y)
            return np.where(const, 0.0, out)

        return norm

    norm_p, norm_a = bounds(proprio), bounds(action, [True] * 6 + [False])
    return types.SimpleNamespace(
        dir=d,
        raw=raw,
        decoded=decoded,
        decoded_tf=decoded_tf,
        proprio=[norm_p(p) for p in proprio],
        action=[norm_a(a) for a in action],
    )


def _cfg(rlds, views, **kw):
    args = dict(mixture=NAME, data_dir=views.dir, statistics_dir=f"{views.dir}/stats", shuffle_buffer=1)
    args.update(kw)
    return make_cfg(rlds, **args)


def _take(pipe, n):
    return [b for _, b in zip(range(n), pipe)]


def _to_uint8(x):
    """Pipeline pixels `[..., S, S, 6]` -> the uint8 RGB they were made from (first half)."""
    return (x * FUSED_STD + FUSED_MEAN)[..., :3] * 255.0


def _locate(views, first_action):
    """(episode, step) whose normalised action equals `first_action` (actions are random floats)."""
    hits = [
        (e, t) for e, a in enumerate(views.action) for t in range(len(a)) if np.allclose(a[t], first_action, atol=1e-5)
    ]
    assert len(hits) == 1, (first_action, hits)
    return hits[0]


def test_views_proprio_and_chunks_match_numpy(rlds, views):
    cfg = _cfg(rlds, views, image_views=("primary", "wrist"), proprio=True, future_action_window_size=2)
    pipe = RLDSPipeline(cfg, rlds.tok)
    seen_end, errs = 0, []
    for n_batch, batch in enumerate(pipe):
        if n_batch == 12 or (n_batch >= 3 and seen_end):  # flatten interleaves 16 episodes: the
            break  # last steps come after a few batches
        assert set(batch) == {
            "pixel_values",
            "proprio",
            "input_ids",
            "attention_mask",
            "labels",
            "action",
            "dataset_name",
        }
        assert batch["pixel_values"].shape == (8, 2, 32, 32, 6) and batch["pixel_values"].dtype == np.float32
        assert batch["proprio"].shape == (8, 8) and batch["proprio"].dtype == np.float32
        assert batch["action"].shape == (8, 3, 7)
        for i in range(8):
            e, t = _locate(views, batch["action"][i, 0])
            T = len(views.action[e])
            want = [
                views.action[e][t + k] if t + k < T else np.r_[np.zeros(6), views.action[e][-1][6:]] for k in range(3)
            ]  # past the end: neutral movement, the last gripper command
            np.testing.assert_allclose(batch["action"][i], want, atol=1e-5)
            seen_end += t + 2 > T - 1
            np.testing.assert_allclose(batch["proprio"][i], views.proprio[e][t], atol=1e-5)
            px = _to_uint8(batch["pixel_values"][i])
            for n, key in enumerate(("image", "wrist_image")):
                # exact: the stored bytes through tf.io.decode_jpeg (the original's decoder, fast IDCT)
                np.testing.assert_allclose(px[n], views.decoded_tf[e][key][t], atol=1e-3, err_msg=key)
                # independent: PIL (accurate IDCT, other chroma upsampling) differs by up to ~12 levels
                # on the sharp edges of these tiny JPEGs, 1-2 on average; other views differ by > 20
                err = np.abs(px[n] - views.decoded[e][key][t].astype(np.float32))
                assert err.max() <= 24 and err.mean() < 4.0, (key, e, t, err.max(), err.mean())
                errs.append(err.mean())
            # the views are really different cameras (a swap or a copy would fail above and here)
            assert np.abs(px[0] - px[1]).mean() > 20
    assert seen_end > 0  # some chunks ran past an episode's end
    print(
        f"pixel error vs PIL: mean {np.mean(errs):.3f} levels over {len(errs)} views, "
        f"{n_batch} batches, {seen_end} chunks past an episode end"
    )


def test_default_batches_unchanged(rlds, views):
    base = _take(RLDSPipeline(_cfg(rlds, views), rlds.tok), 2)
    one = _take(RLDSPipeline(_cfg(rlds, views, image_views=("primary",)), rlds.tok), 2)
    for b, o in zip(base, one):
        assert set(b) == {"pixel_values", "input_ids", "attention_mask", "labels", "action", "dataset_name"}
        assert b["pixel_values"].shape == (8, 32, 32, 6) and b["action"].shape == (8, 1, 7)
        assert o["pixel_values"].shape == (8, 1, 32, 32, 6)
        np.testing.assert_array_equal(b["input_ids"], o["input_ids"])
        np.testing.assert_array_equal(b["pixel_values"], o["pixel_values"][:, 0])


def test_augment_views_independently(rlds, views):
    kw = dict(image_views=("primary", "wrist"), shuffle_buffer=1)
    on = _take(RLDSPipeline(_cfg(rlds, views, augment=True, **kw), rlds.tok), 1)[0]
    off = _take(RLDSPipeline(_cfg(rlds, views, augment=False, **kw), rlds.tok), 1)[0]
    np.testing.assert_array_equal(on["action"], off["action"])  # same frames, same order
    lo, hi = (0 - FUSED_MEAN) / FUSED_STD, (1 - FUSED_MEAN) / FUSED_STD
    assert (on["pixel_values"] >= lo - 1e-5).all() and (on["pixel_values"] <= hi + 1e-5).all()
    for n in range(2):
        assert not np.allclose(on["pixel_values"][:, n], off["pixel_values"][:, n]), n


def test_missing_view_raises_or_pads(rlds):
    with pytest.raises(DataError, match=r"bridge_orig.*\['wrist'\]"):
        RLDSPipeline(make_cfg(rlds, mixture="bridge_orig", image_views=("primary", "wrist")), rlds.tok)
    pad = RLDSPipeline(
        make_cfg(rlds, mixture="bridge_orig", image_views=("primary", "wrist"), pad_missing_views=True), rlds.tok
    )
    px = next(iter(pad))["pixel_values"]
    black = np.broadcast_to(-FUSED_MEAN / FUSED_STD, px[:, 1].shape)
    np.testing.assert_allclose(px[:, 1], black, atol=1e-6)
    assert np.abs(px[:, 0] - black).max() > 0.5  # the primary camera is a real image


def test_no_proprio_and_window_errors(rlds):
    from openvla_jax.data.oxe import register_dataset, transforms

    register_dataset("test_views_stateless", standardize=transforms.identity, image_keys={"primary": "image"})
    with pytest.raises(DataError, match="test_views_stateless.*no state keys"):
        RLDSPipeline(make_cfg(rlds, mixture="test_views_stateless", proprio=True), rlds.tok)
    with pytest.raises(ValueError, match="window_size=1"):
        RLDSPipeline(make_cfg(rlds, mixture="bridge_orig", image_views=("primary",), window_size=2), rlds.tok)
    with pytest.raises(ValueError, match="distinct"):
        RLDSPipeline(make_cfg(rlds, mixture="bridge_orig", image_views=("primary", "primary")), rlds.tok)


def test_wrist_views_are_not_cropped():
    """With the colour jitter switched off, crop=False (wrist cameras) leaves the image as it is."""
    from openvla_jax.data import transforms as X

    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    one = (1.0, 1.0 + 1e-6)  # tf needs upper > lower
    still = dict(brightness=0.0, contrast=one, saturation=one, hue=0.0, crop_scale=0.5)
    got = X.augment_image(img, [1, 2], crop=False, **still).numpy().astype(int)
    assert np.abs(got - img).max() <= 1
    assert np.abs(X.augment_image(img, [1, 2], **still).numpy().astype(int) - img).mean() > 10
