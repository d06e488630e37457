"""Trajectory transforms (chunking, subsampling, unlabeled filter) and frame transforms
(decode, resize, augmentation), all TensorFlow ops for tf.data maps.

Standardized trajectory layout used here (see `rlds.py`):
    observation: {image_<view>: encoded bytes or uint8 [T, ...], proprio: float32 [T, P], ...}
    task: {language_instruction: string [T]}
    action: float32 [T, A]
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

# --- trajectory transforms -----------------------------------------------------------------------


def is_labeled(traj: dict) -> tf.Tensor:
    """True when any step has a non-empty instruction (the original's unlabeled filter)."""
    return tf.reduce_any(tf.strings.length(traj["task"]["language_instruction"]) > 0)


def chunk_act_obs(
    traj: dict, window_size: int = 1, future_action_window_size: int = 0, absolute_mask: Sequence[bool] | None = None
) -> dict:
    """Observation windows and action chunks, as the original's `chunk_act_obs`.

    observation leaves `[T, ...]` -> `[T, window, ...]` (indices t-window+1..t, clamped at 0, with
    `observation.pad_mask [T, window]` false where clamped); action `[T, A]` ->
    `[T, window + future, A]` (indices t-window+1..t+future, clamped to [0, T-1]). Actions past the
    episode's end are *neutral*: relative dims 0 (in normalised units, as the original's), absolute
    dims (`absolute_mask [A]`, e.g. the gripper; None: all relative) repeat the last command.
    window 1 / future 0 reproduces OpenVLA (a single action per frame, kept as `[T, 1, A]`).
    """
    t_len = tf.shape(traj["action"])[0]
    steps = tf.range(t_len)[:, None]
    obs_idx = steps + tf.range(-window_size + 1, 1)[None]
    act_idx = steps + tf.range(-window_size + 1, 1 + future_action_window_size)[None]
    floored = tf.maximum(obs_idx, 0)
    traj = dict(traj)
    traj["observation"] = tf.nest.map_structure(lambda x: tf.gather(x, floored), traj["observation"])
    traj["observation"]["pad_mask"] = obs_idx >= 0
    action = tf.gather(traj["action"], tf.clip_by_value(act_idx, 0, t_len - 1))  # [T, K, A]
    if future_action_window_size > 0:
        absolute = (
            tf.zeros([action.shape[-1]], tf.bool)
            if absolute_mask is None
            else tf.constant(list(absolute_mask), tf.bool)
        )
        neutral = tf.where(absolute, action, tf.zeros_like(action))
        action = tf.where((act_idx > t_len - 1)[:, :, None], neutral, action)
    traj["action"] = action
    return traj


def subsample(traj: dict, length: int, seed) -> dict:
    """Keep `length` random steps (in time order) of trajectories longer than `length`."""
    t_len = tf.shape(traj["action"])[0]
    shuffled = tf.random.experimental.stateless_shuffle(tf.range(t_len), seed)  # pyright: ignore[reportAttributeAccessIssue]
    idx = tf.sort(shuffled[:length])
    return tf.cond(t_len > length, lambda: tf.nest.map_structure(lambda x: tf.gather(x, idx), traj), lambda: traj)


# --- frame transforms ----------------------------------------------------------------------------


def decode_image(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG) or uint8 `[H, W, 3]` -> uint8 `[H', W', 3]` at `size`.

    An empty string (a camera the dataset lacks) becomes a black image.
    """
    if image.dtype == tf.string:
        image = tf.cond(
            tf.strings.length(image) > 0,
            lambda: tf.io.decode_image(image, channels=3, expand_animations=False),
            lambda: tf.zeros([*size, 3], tf.uint8),
        )
    return resize_image(image, size)


def resize_image(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """uint8 `[..., H, W, 3]` -> uint8 at `size`: lanczos3 + antialias, rounded and clipped (as the
    original training data)."""
    from openvla_jax.models.preprocess import tf_resize_uint8  # one definition shared with eval

    return tf_resize_uint8(image, size)


AUGMENT_DEFAULTS = dict(
    crop_scale=0.9, crop_ratio=1.0, brightness=0.2, contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=0.05
)


def random_resized_crop(image: tf.Tensor, scale: float, ratio: float, seed) -> tf.Tensor:
    """float `[H, W, C]`: crop a box of area `scale` (aspect `ratio`) at a random place, resize back
    to `[H, W]` (bilinear)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    box_h = min((scale / ratio) ** 0.5, 1.0)
    box_w = min((scale * ratio) ** 0.5, 1.0)
    off = tf.random.stateless_uniform([2], seed, 0.0, 1.0) * tf.constant([1 - box_h, 1 - box_w])
    box = tf.stack([off[0], off[1], off[0] + box_h, off[1] + box_w])[None]
    return tf.image.crop_and_resize(image[None], box, [0], tf.stack([h, w]))[0]


def augment_image(
    image: tf.Tensor,
    seed,
    crop_scale=0.9,
    crop_ratio=1.0,
    brightness=0.2,
    contrast=(0.8, 1.2),
    saturation=(0.8, 1.2),
    hue=0.05,
    crop: bool = True,
) -> tf.Tensor:
    """OpenVLA training augmentation on uint8 `[H, W, 3]` with a stateless seed `[2]` -> uint8.

    Order: random resized crop, brightness, contrast, saturation, hue; each result clipped to [0, 1].
    `crop=False` skips the crop (wrist cameras, as Octo's per-view augmentation does: a crop of a
    wrist view moves the gripper out of its fixed place); the colour jitter keeps the same seeds.
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5))  # pyright: ignore[reportAttributeAccessIssue]
    x = tf.image.convert_image_dtype(image, tf.float32)
    if crop:
        x = tf.clip_by_value(random_resized_crop(x, crop_scale, crop_ratio, seeds[0]), 0, 1)
    x = tf.clip_by_value(tf.image.stateless_random_brightness(x, brightness, seeds[1]), 0, 1)
    x = tf.clip_by_value(tf.image.stateless_random_contrast(x, *contrast, seeds[2]), 0, 1)
    x = tf.clip_by_value(tf.image.stateless_random_saturation(x, *saturation, seeds[3]), 0, 1)
    x = tf.clip_by_value(tf.image.stateless_random_hue(x, hue, seeds[4]), 0, 1)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)
