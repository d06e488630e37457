"""Data-pipeline throughput: frames/s to model-ready batches vs a plain tf.data decode + resize.

`bench_data()` writes (or reuses) a synthetic Bridge-format RLDS dataset (`bridge_orig`: cameras
`image_0` and `image_1` as 256x256 JPEG, 7-dim state and action), then times (1) a baseline that
only reads, decodes and resizes the primary camera's images to 224 with tf.data, and (2) our full
pipeline in the original's training configuration (bridge standardize: relabel from state deltas,
binarize the gripper; normalize, tokenize, shuffle, decode, resize, pixel normalisation, batching)
with augmentation off and on, delivering normalised float32 pixels or raw uint8 ones (`pixels="uint8"`,
normalised by the model on the device). The ratio baseline / ours is our overhead. Called from `scripts/bench.py`.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

DATASET = "bridge_orig"


def _write_synthetic(data_dir: str, n_episodes: int, steps: int, seed: int = 0) -> None:
    from openvla_jax.data.rlds_writer import write_rlds

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]

    def episode(e):
        imgs = np.stack(
            [np.stack([(xx + 3 * t + e) % 256, (yy * 2 + e) % 256, (xx + yy + t) % 256], -1) for t in range(steps)]
        ).astype(np.uint8)
        noise = rng.integers(0, 24, imgs.shape, dtype=np.uint8)  # JPEG-realistic texture
        act = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
        return {
            "steps": {
                "observation": {
                    "image_0": imgs + noise,
                    "image_1": imgs,
                    "state": np.cumsum(rng.normal(0, 0.02, (steps, 7)), 0).astype(np.float32),
                },
                "action": act,
                "language_instruction": "put the bowl on the plate",
                "is_first": np.arange(steps) == 0,
                "is_last": np.arange(steps) == steps - 1,
                "is_terminal": np.arange(steps) == steps - 1,
                "reward": np.zeros(steps, np.float32),
                "discount": np.ones(steps, np.float32),
            },
            "episode_metadata": {"file_path": f"/synthetic/{e}"},
        }

    write_rlds(data_dir, DATASET, (episode(e) for e in range(n_episodes)), image_format="jpeg")


def _tiny_tokenizer(out_dir: str) -> str:
    from openvla_jax.tokenizer.small_spm import write_sentencepiece

    return write_sentencepiece(out_dir, ["put the bowl on the plate"], vocab_size=300)


def _time(iterator, n_batches: int, batch_size: int, warmup: int) -> float:
    for _ in range(warmup):
        next(iterator)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    return n_batches * batch_size / (time.perf_counter() - t)


def _baseline(data_dir: str, batch_size: int, size: int):
    import tensorflow as tf

    from openvla_jax.data.traj import TrajDataset, open_builder

    ds = TrajDataset.from_rlds(open_builder(DATASET, data_dir), "train").repeat()
    ds = ds.traj_map(lambda t: {"image": t["observation"]["image_0"]}).flatten()
    img = ds.ds.map(
        lambda f: tf.cast(
            tf.clip_by_value(
                tf.round(
                    tf.image.resize(
                        tf.io.decode_image(f["image"], channels=3, expand_animations=False),
                        (size, size),
                        "lanczos3",
                        antialias=True,
                    )
                ),
                0,
                255,
            ),
            tf.uint8,
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return iter(img.batch(batch_size).prefetch(2).as_numpy_iterator())


def bench_data(
    data_dir: str | None = None,
    n_batches: int = 20,
    batch_size: int = 16,
    image_size: int = 224,
    n_episodes: int = 40,
    steps: int = 20,
    warmup: int = 3,
    shuffle_buffer: int = 2000,
) -> dict:
    """Frames/s of the baseline and of our pipeline (augment off / on) on this machine."""
    from openvla_jax.data.rlds import DataConfig, RLDSPipeline
    from openvla_jax.tokenizer.text import TextTokenizer

    tmp = tempfile.mkdtemp(prefix="openvla_bench_")
    if data_dir is None:
        data_dir = os.path.join(tmp, "data")
        _write_synthetic(data_dir, n_episodes, steps)
    tok = TextTokenizer(_tiny_tokenizer(tmp))
    result = {"batch_size": batch_size, "image_size": image_size, "n_batches": n_batches, "cpu_count": os.cpu_count()}
    result["baseline_fps"] = _time(_baseline(data_dir, batch_size, image_size), n_batches, batch_size, warmup)
    for augment, pixels in ((False, "float32"), (True, "float32"), (False, "uint8"), (True, "uint8")):
        cfg = DataConfig(
            pixels=pixels,
            data_dir=data_dir,
            mixture=DATASET,
            batch_size=batch_size,
            image_size=image_size,
            augment=augment,
            shuffle_buffer=shuffle_buffer,
            process_index=0,
            process_count=1,
            statistics_dir=os.path.join(tmp, "stats"),
            progress=False,
        )
        fps = _time(iter(RLDSPipeline(cfg, tok)), n_batches, batch_size, warmup)
        suffix = ("_aug" if augment else "") + ("_uint8" if pixels == "uint8" else "")
        result[f"pipeline{suffix}_fps"] = fps
        result[f"overhead_ratio{suffix}"] = result["baseline_fps"] / fps
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(bench_data(), indent=1))
