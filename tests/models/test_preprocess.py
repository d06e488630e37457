"""Image preprocessing: PIL-exact bicubic resize, normalisation, the TF training/eval resizes."""

import numpy as np
import pytest
from PIL import Image

from openvla_jax.models import preprocess as pp
from tests.support.helpers import max_abs, torch


def smooth_image(h, w, seed=0, noise=20.0):
    """A natural-ish image (smooth gradients plus noise, saturated areas) so resizing overshoots."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127.5 + 140 * np.sin(xx[..., None] / (w / 7.0) + np.arange(3)) * np.cos(yy[..., None] / (h / 5.0))
    return np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)


# Tall ones too: Pillow 13 runs the vertical pass first when the height shrinks much more.
SIZES = [(480, 640), (256, 256), (224, 224), (100, 37), (600, 224), (181, 333), (300, 240), (1000, 230), (640, 480)]


@pytest.mark.parametrize("h,w", SIZES)
def test_resize_matches_pil_bicubic(h, w):
    for img in (smooth_image(h, w), np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)):
        ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
        got = pp.resize_bicubic_uint8(img)
        assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
        diff = np.abs(got.astype(int) - ref.astype(int)).max()
        assert diff <= 1  # the requirement is 1/255; the fixed-point emulation is in fact exact
        assert diff == 0


def test_preprocess_image_matches_pil_then_normalize():
    """HF processor path: PIL bicubic -> ToTensor (/255) -> Normalize per tower, stacked [DINOv2 | SigLIP]."""
    img = smooth_image(360, 480, seed=2)
    got = pp.preprocess_image(img)
    assert got.shape == (224, 224, 6) and got.dtype == np.float32
    x = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).astype(np.float64) / 255.0
    dino = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    siglip = (x - 0.5) / 0.5
    # Undo the normalisation to compare in [0, 1] pixel units (<= 1/255), then the values themselves.
    assert max_abs(got[..., :3] * np.array(pp.DINOV2_STD) + np.array(pp.DINOV2_MEAN), x) <= 1 / 255
    assert max_abs(got[..., :3], dino) < 1e-5 and max_abs(got[..., 3:], siglip) < 1e-5
    batch = pp.preprocess_images([img, img[:200]])
    assert batch.shape == (2, 224, 224, 6) and np.array_equal(batch[0], got)


@pytest.mark.parametrize("n_in,n_out", [(16, 18), (16, 8), (37, 16), (640, 224), (100, 224)])
def test_resize_weights_match_torch_antialiased_bicubic(n_in, n_out):
    t = torch()
    x = np.random.default_rng(3).standard_normal((1, 1, n_in, 5)).astype(np.float32)
    ref = t.nn.functional.interpolate(t.tensor(x), size=(n_out, 5), mode="bicubic", antialias=True, align_corners=False)
    got = np.einsum("oi,i...->o...", pp.resize_weights(n_in, n_out), x[0, 0].astype(np.float64))
    assert max_abs(got, ref.numpy()[0, 0]) < 1e-4  # torch computes sample centres in fp32
    assert np.allclose(pp.resize_weights(n_in, n_out).sum(axis=1), 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((224, 224), np.uint8),
        np.zeros((224, 224, 4), np.uint8),
        np.zeros((3, 224, 224), np.uint8),
        np.zeros((224, 224, 3), np.float32),
    ],
)
def test_wrong_image_shape_or_dtype_names_expected_shape(bad):
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        pp.preprocess_image(bad)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        pp.preprocess_images(np.zeros((224, 224, 3), np.uint8))


def test_tf_resize_is_deterministic_uint8():
    img = smooth_image(256, 320, seed=4)
    a, b = np.asarray(pp.tf_resize_uint8(img)), np.asarray(pp.tf_resize_uint8(img))
    assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
    assert np.array_equal(a, b)
    batched = np.asarray(pp.tf_resize_uint8(np.stack([img, img[::-1]])))
    assert np.array_equal(batched[0], a)
    # A constant image stays constant (lanczos3 weights are normalised) and the result is rounded.
    assert np.all(np.asarray(pp.tf_resize_uint8(np.full((300, 500, 3), 77, np.uint8))) == 77)
    # Close to PIL's Lanczos (same kernel family, different implementation): within a few levels.
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.LANCZOS)).astype(int)
    assert np.abs(a.astype(int) - pil).mean() < 1.0
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        pp.tf_resize_uint8(np.zeros((224, 224, 3), np.float32))


def _bilinear_crop_reference(img, crop_scale, out):
    """NumPy `tf.image.crop_and_resize` (bilinear, box centred with side sqrt(scale)) + TF's
    float -> uint8 conversion (x * 255.5, truncated)."""
    h, w, _ = img.shape
    side = np.sqrt(np.float32(crop_scale))
    off = (1 - side) / 2
    x = img.astype(np.float64) / 255.0

    def coords(n):
        return off * (n - 1) + np.arange(out) * (side * (n - 1) / (out - 1))

    ys, xs = coords(h), coords(w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bot = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    val = top * (1 - fy) + bot * fy
    return np.clip(np.floor(val * 255.5), 0, 255).astype(np.uint8)


def test_tf_center_crop_matches_bilinear_reference():
    img = smooth_image(224, 224, seed=5)
    got = np.asarray(pp.tf_center_crop(img, 0.9))
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    ref = _bilinear_crop_reference(img, 0.9, 224)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # fp32 vs fp64 rounding at .5 edges
    assert np.mean(got == ref) > 0.99
    assert np.array_equal(np.asarray(pp.tf_center_crop(img[None], 0.9))[0], got)
    assert np.array_equal(np.asarray(pp.tf_center_crop(img, 1.0)), img)  # full-area crop is the identity


def test_tf_eval_resize_jpeg_roundtrip():
    img = smooth_image(256, 256, seed=6, noise=0.0)
    out = np.asarray(pp.tf_eval_resize(img))
    assert out.shape == (224, 224, 3) and np.array_equal(out, np.asarray(pp.tf_eval_resize(img)))
    # The JPEG round trip perturbs the image only slightly.
    assert np.abs(out.astype(int) - np.asarray(pp.tf_resize_uint8(img)).astype(int)).mean() < 4


def test_resize_modes_give_each_pipelines_pixels():
    """`resize_uint8_images` modes reproduce the function each names, per image and batched, and
    differ from one another on a real-looking image; bad modes and crops are refused by name."""
    ims = [smooth_image(181, 333, seed=s) for s in range(3)]
    batch = np.stack(ims)
    proc = pp.resize_uint8_images(batch, 56, "processor")
    train = pp.resize_uint8_images(batch, 56, "train")
    jpeg = pp.resize_uint8_images(ims, 56, "train_jpeg")
    crop = pp.resize_uint8_images(batch, 56, "train", center_crop=0.9)
    for i, im in enumerate(ims):
        np.testing.assert_array_equal(proc[i], pp.resize_bicubic_uint8(im, (56, 56)))
        np.testing.assert_array_equal(train[i], np.asarray(pp.tf_resize_uint8(im, (56, 56))))
        np.testing.assert_array_equal(jpeg[i], np.asarray(pp.tf_eval_resize(im, (56, 56))))
    np.testing.assert_array_equal(crop, np.asarray(pp.tf_center_crop(train, 0.9, (56, 56))))
    # A list of different sizes goes image by image, with the same result as one at a time.
    mixed = [ims[0], smooth_image(100, 37)]
    np.testing.assert_array_equal(
        pp.resize_uint8_images(mixed, 56, "train")[1], np.asarray(pp.tf_resize_uint8(mixed[1], (56, 56)))
    )
    for a, b in ((proc, train), (train, jpeg), (train, crop)):
        assert (a != b).mean() > 0.05  # a fraction of all pixel values differs
    np.testing.assert_allclose(pp.preprocess_images(batch, 56, "train"), pp.normalize_uint8(train))
    with pytest.raises(ValueError, match="'bilinear' is not one of"):
        pp.resize_uint8_images(batch, 56, "bilinear")
    with pytest.raises(ValueError, match="center_crop"):
        pp.resize_uint8_images(batch, 56, "train", center_crop=1.5)


def test_resize_matches_pil_on_random_sizes_down_and_up():
    """Random input and output sizes (PIL's pass order depends on both), every pixel equal."""
    rng = np.random.default_rng(3)
    for _ in range(25):
        (h, w), (oh, ow) = rng.integers(16, 500, 2), rng.integers(16, 300, 2)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((int(ow), int(oh)), Image.BICUBIC))
        assert np.array_equal(pp.resize_bicubic_uint8(img, (oh, ow)), ref), (h, w, oh, ow)
