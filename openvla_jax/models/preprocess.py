"""Image preprocessing for the fused DINOv2 + SigLIP backbone: inference resize + normalisation,
and the training/evaluation-side TensorFlow resizes.

Layout inside openvla_jax is NHWC: `pixel_values [B, 224, 224, 6]` float32, channels 0-2 normalised
for DINOv2 and 3-5 for SigLIP (the HF processor's NCHW `[B, 6, 224, 224]` is accepted at the API
boundary and transposed, see `openvla_jax.models.vision.to_nhwc`).

Inference (`preprocess_image`): what the HF processor does on a PIL image: torchvision `resize` ->
PIL bicubic resize to 224x224 (aspect ratio not kept, PIL's resampling is always antialiased), then
`/ 255` and per-tower normalisation. `resize_bicubic_uint8` reproduces PIL's fixed-point algorithm in
NumPy (bit-exact for 8-bit RGB), so no torch and no PIL is needed.

Training (`tf_resize_uint8`): RLDS frames were resized with `tf.image.resize(lanczos3, antialias)`,
rounded and clipped to uint8; evaluation adds a JPEG round trip (`tf_eval_resize`) and, for models
trained with random crops, a center crop of area 0.9 resized back (`tf_center_crop`).

`preprocess_images(images, size, resize=..., center_crop=...)` picks one of `RESIZE_MODES`:
  "processor"   the HF processor (PIL bicubic): what the original `predict_action` sees
  "train"       the RLDS training pipeline's TF lanczos3 resize: the pixels a model trained here saw
                for the same frame (PNG or raw frames)
  "train_jpeg"  a JPEG round trip first, as OpenVLA's evaluation scripts do for datasets stored as JPEG
and, with `center_crop` > 0, OpenVLA's evaluation center crop of that area fraction (0.9 for models
trained with random-resized-crop augmentation).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Per output channel, so one affine map turns [0, 1] RGB (repeated twice) into the 6 channels.
FUSED_MEAN = np.array(DINOV2_MEAN + SIGLIP_MEAN, np.float32)
FUSED_STD = np.array(DINOV2_STD + SIGLIP_STD, np.float32)
IMAGE_SIZE = 224
RESIZE_MODES = ("processor", "train", "train_jpeg")

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point coefficient precision for 8-bit images


def normalize_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` -> float32 `[..., H, W, 6]` (DINOv2 channels, then SigLIP channels)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [..., H, W, 3], got {images.dtype} {images.shape}")
    x = images.astype(np.float32) / 255.0
    return (np.concatenate([x, x], axis=-1) - FUSED_MEAN) / FUSED_STD


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (PIL's BICUBIC, and torch's antialiased bicubic)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """float64 `[out_size, in_size]` matrix of antialiased bicubic resampling, as PIL's
    `precompute_coeffs` and torch's `interpolate(bicubic, antialias=True, align_corners=False)`:
    the kernel is stretched by the downscale factor, truncated at the borders and renormalised."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        k = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0.0 else k
    w.flags.writeable = False
    return w


def _pil_pass(image: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One 8-bit PIL resampling pass along `axis` (0 rows, 1 columns): integer coefficients with
    22 fractional bits, accumulator starts at one half, then shift and clip to uint8."""
    k = np.where(weights < 0, -0.5 + weights * (1 << _PRECISION_BITS), 0.5 + weights * (1 << _PRECISION_BITS))
    k = np.trunc(k)  # C's (int) cast truncates towards zero
    # Integer arithmetic carried in float64: |k| < 2^23, pixels < 2^8 and at most a few hundred taps,
    # so every product and partial sum is an integer below 2^53, exact in any summation order, and
    # the matmul runs on BLAS (an int64 tensordot has no BLAS path and was ~10x slower).
    x = np.moveaxis(image.astype(np.float64), axis, 0)  # [in, other, C]
    acc = np.tensordot(k, x, axes=(1, 0)) + float(1 << (_PRECISION_BITS - 1))
    out = np.clip(np.floor(acc / float(1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)  # = acc >> bits
    return np.moveaxis(out, 0, axis)


def _check_image(image, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 [H, W, 3], got dtype {image.dtype}")
    if not image.size:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


@functools.lru_cache(maxsize=None)
def _pillow_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("pillow").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 13  # no Pillow to match: the current rule


def pil_vertical_first(in_hw: Sequence[int], out_hw: Sequence[int]) -> bool:
    """Whether PIL's resize runs its vertical pass first (each pass rounds to uint8, so the order
    shows in the pixels). Pillow up to 12 always went horizontal first; Pillow 13 goes vertical first
    when the height loses more than twice as many pixels as the width (enlarging counts as 0). The
    rule was measured against Pillow 13.0.0: 300 random sizes, down and up, every pixel equal."""
    if _pillow_major() < 13:
        return False
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    return max(0, in_h - out_h) > 2 * max(0, in_w - out_w)


def resize_bicubic_uint8(image: np.ndarray, size: Sequence[int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[h, w, 3]` exactly as the installed PIL's
    `Image.resize((w, h), BICUBIC)`: one pass per axis, each rounded to uint8, in PIL's order
    (`pil_vertical_first`); aspect ratio not kept."""
    image = _check_image(image)
    h, w = int(size[0]), int(size[1])
    passes = [(1, w), (0, h)]
    if pil_vertical_first(image.shape[:2], (h, w)):
        passes.reverse()
    for axis, n in passes:
        if image.shape[axis] != n:
            image = _pil_pass(image, resize_weights(image.shape[axis], n), axis=axis)
    return image


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """One uint8 RGB image `[H, W, 3]` (or a PIL image) -> float32 `[size, size, 6]` pixel values
    (bicubic resize, [0, 1], DINOv2 normalisation on channels 0-2, SigLIP on 3-5)."""
    return normalize_uint8(resize_bicubic_uint8(image, (size, size)))


def check_preprocessing(resize: str, center_crop: float) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"image resize {resize!r} is not one of {RESIZE_MODES}")
    if not 0.0 <= float(center_crop) <= 1.0:
        raise ValueError(f"center_crop is an area fraction in [0, 1] (0: none), got {center_crop}")


def resize_uint8_images(
    images, size: int = IMAGE_SIZE, resize: str = "processor", center_crop: float = 0.0
) -> np.ndarray:
    """A list of uint8 `[H_i, W_i, 3]` images or a uint8 `[B, H, W, 3]` batch -> uint8
    `[B, size, size, 3]`, resized as `resize` says (see the module docstring), then center-cropped
    when `center_crop` > 0."""
    check_preprocessing(resize, center_crop)
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"expected a batch of RGB images [B, H, W, 3], got shape {images.shape}")
    images = [_check_image(im, f"image {i}") for i, im in enumerate(images)]
    if not images:
        raise ValueError("expected at least one image")
    if resize == "processor":
        out = np.stack([resize_bicubic_uint8(im, (size, size)) for im in images])
    elif resize == "train" and len({im.shape for im in images}) == 1:
        out = np.asarray(tf_resize_uint8(np.stack(images), (size, size)))  # one batched TF call
    else:
        one = tf_resize_uint8 if resize == "train" else tf_eval_resize
        out = np.stack([np.asarray(one(im, (size, size))) for im in images])
    if center_crop and center_crop < 1.0:
        out = np.asarray(tf_center_crop(out, center_crop, (size, size)))
    return out


def preprocess_images(
    images, size: int = IMAGE_SIZE, resize: str = "processor", center_crop: float = 0.0
) -> np.ndarray:
    """A list of uint8 `[H_i, W_i, 3]` images or a uint8 `[B, H, W, 3]` batch -> `[B, size, size, 6]`
    (`resize_uint8_images`, then `normalize_uint8`)."""
    return normalize_uint8(resize_uint8_images(images, size, resize, center_crop))


# ---------------------------------------------------------------- TensorFlow (training / evaluation)


def tf_resize_uint8(images, size: Sequence[int] = (IMAGE_SIZE, IMAGE_SIZE)):
    """uint8 `[..., H, W, 3]` -> uint8 `[..., h, w, 3]`: `tf.image.resize(lanczos3, antialias=True)`,
    rounded and clipped, as the RLDS pipeline resized training frames. Deterministic (no randomness,
    a pure function of its input)."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [H, W, 3] or [B, H, W, 3], got {images.dtype.name} {images.shape}")
    out = tf.image.resize(images, tuple(size), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def tf_eval_resize(image, size: Sequence[int] = (IMAGE_SIZE, IMAGE_SIZE)):
    """The evaluation scripts' resize of a uint8 `[H, W, 3]` camera frame: JPEG encode/decode (as the
    RLDS builders stored frames), then `tf_resize_uint8`."""
    import tensorflow as tf

    image = tf.convert_to_tensor(_check_image(np.asarray(image)))
    image = tf.io.decode_image(tf.image.encode_jpeg(image), expand_animations=False, dtype=tf.uint8)
    return tf_resize_uint8(image, size)


def tf_center_crop(images, crop_scale: float = 0.9, size: Sequence[int] = (IMAGE_SIZE, IMAGE_SIZE)):
    """uint8 `[H, W, 3]` or `[B, H, W, 3]` -> uint8 `[(B,) h, w, 3]`: the center crop of area
    `crop_scale` (side sqrt(crop_scale)) bilinearly resized back, as OpenVLA's eval `crop_and_resize`
    for models trained with random-resized-crop augmentation."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [H, W, 3] or [B, H, W, 3], got {images.dtype.name} {images.shape}")
    single = images.shape.rank == 3
    x = tf.image.convert_image_dtype(images[None] if single else images, tf.float32)
    b = tf.shape(x)[0]
    side = tf.clip_by_value(tf.sqrt(tf.cast(crop_scale, tf.float32)), 0.0, 1.0)
    off = (1.0 - side) / 2.0
    box = tf.stack([off, off, off + side, off + side])
    boxes = tf.tile(box[None], [b, 1])  # pyright: ignore[reportArgumentType]  (tf packs a list with tensors)
    x = tf.clip_by_value(tf.image.crop_and_resize(x, boxes, tf.range(b), tuple(size)), 0.0, 1.0)
    x = tf.image.convert_image_dtype(x, tf.uint8, saturate=True)
    return x[0] if single else x
