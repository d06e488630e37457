"""Test fixtures: a tiny sentencepiece model and tiny RLDS datasets in the real tfds on-disk format.

Datasets carry the field names and dtypes of the released `bridge_orig` (builder `bridge_dataset`
inside a folder named `bridge_orig`), `fractal20220817_data` and `libero_spatial_no_noops`, with
small images so the tests stay fast. Values are seeded so tests can recompute them with NumPy.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name: str):
    """`scripts/<name>.py` as a module (e.g. `load_script("make_demo_data").make_demo_data(...)`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INSTRUCTIONS = [
    "put the spoon in the pot",
    "Pick up the red block",
    "open the drawer",
    "move the cup to the left",
    "close the microwave door",
]


def train_tiny_sentencepiece(out_dir: str, vocab_size: int = 400) -> str:
    """A Llama-like BPE sentencepiece model (byte fallback, digits split, whitespace kept)."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    text = os.path.join(out_dir, "corpus.txt")
    with open(text, "w") as f:
        for i in range(60):
            for s in INSTRUCTIONS:
                f.write(f"In: What action should the robot take to {s.lower()}?\nOut: {i}\n")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return out_dir


def _image(rng, hw, t):
    """A smooth image (JPEG-friendly) that changes with the step index."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, 3)
    img = np.stack([(xx * 4 + t * 9 + base[0]) % 256, (yy * 4 + base[1]) % 256, ((xx + yy) * 2 + base[2]) % 256], -1)
    return img.astype(np.uint8)


def _store(name, version, features, episodes, data_dir):
    from openvla_jax.data.rlds_writer import write_rlds

    return write_rlds(data_dir, name, {"train": episodes}, features=features, version=version)


def _steps_common(T):
    return dict(
        discount=np.ones(T, np.float32),
        reward=np.zeros(T, np.float32),
        is_first=np.arange(T) == 0,
        is_last=np.arange(T) == T - 1,
        is_terminal=np.arange(T) == T - 1,
    )


def _as_steps(d):
    return d  # write_rlds takes step fields stacked over time


def write_bridge(
    data_dir: str, n_episodes=4, T=(6, 9), hw=(32, 40), seed=0, instructions=None, override=None
) -> list[dict]:
    """`bridge_orig/1.0.0/bridge_dataset-train.tfrecord*`. Returns raw per-episode arrays."""
    import tensorflow_datasets as tfds

    F = tfds.features
    img = lambda: F.Image(shape=(*hw, 3), dtype=np.uint8, encoding_format="jpeg")  # noqa: E731
    features = F.FeaturesDict(
        {
            "steps": F.Dataset(
                {
                    "observation": F.FeaturesDict(
                        {
                            "image_0": img(),
                            "image_1": img(),
                            "image_2": img(),
                            "image_3": img(),
                            "state": F.Tensor(shape=(7,), dtype=np.float32),
                        }
                    ),
                    "action": F.Tensor(shape=(7,), dtype=np.float32),
                    "discount": F.Scalar(dtype=np.float32),
                    "reward": F.Scalar(dtype=np.float32),
                    "is_first": F.Scalar(dtype=np.bool_),
                    "is_last": F.Scalar(dtype=np.bool_),
                    "is_terminal": F.Scalar(dtype=np.bool_),
                    "language_instruction": F.Text(),
                }
            ),
            "episode_metadata": F.FeaturesDict(
                {
                    "file_path": F.Text(),
                    "episode_id": F.Scalar(dtype=np.int32),
                    "has_language": F.Scalar(dtype=np.bool_),
                }
            ),
        }
    )
    rng = np.random.default_rng(seed)
    raw, episodes = [], []
    for e in range(n_episodes):
        t_len = int(rng.integers(T[0], T[1] + 1))
        state = np.cumsum(rng.normal(0, 0.02, (t_len, 7)), 0).astype(np.float32)
        action = rng.normal(0, 0.05, (t_len, 7)).astype(np.float32)
        # gripper command: open (1), closed (0) and in-between values, as in the raw data
        action[:, 6] = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0, 0.3], t_len).astype(np.float32)
        action[0] = 0.0  # the released data's first action is all zeros
        inst = (instructions or INSTRUCTIONS)[e % len(instructions or INSTRUCTIONS)]
        imgs = [_image(rng, hw, t) for t in range(t_len)]
        obs = {f"image_{k}": np.stack(imgs) for k in range(4)}
        obs["state"] = state
        steps = dict(observation=obs, action=action, language_instruction=[inst] * t_len, **_steps_common(t_len))
        if override:
            override(e, steps)
        episodes.append(
            {
                "steps": _as_steps(steps),
                "episode_metadata": {"file_path": f"/bridge/{e}", "episode_id": e, "has_language": bool(inst)},
            }
        )
        raw.append(dict(state=state, action=action, instruction=inst, images=imgs))
    tmp = os.path.join(data_dir, "_tmp_bridge")
    _store("bridge_dataset", "1.0.0", features, episodes, tmp)
    shutil.move(os.path.join(tmp, "bridge_dataset"), os.path.join(data_dir, "bridge_orig"))
    shutil.rmtree(tmp)
    return raw


def write_fractal(data_dir: str, n_episodes=3, T=(5, 8), hw=(32, 40), seed=1) -> list[dict]:
    """`fractal20220817_data/0.1.0`: RT-1 field names (world_vector, rotation_delta, ...)."""
    import tensorflow_datasets as tfds

    F = tfds.features
    features = F.FeaturesDict(
        {
            "steps": F.Dataset(
                {
                    "observation": F.FeaturesDict(
                        {
                            "image": F.Image(shape=(*hw, 3), dtype=np.uint8, encoding_format="jpeg"),
                            "natural_language_instruction": F.Text(),
                            "natural_language_embedding": F.Tensor(shape=(4,), dtype=np.float32),
                            "base_pose_tool_reached": F.Tensor(shape=(7,), dtype=np.float32),
                            "gripper_closed": F.Tensor(shape=(1,), dtype=np.float32),
                        }
                    ),
                    "action": F.FeaturesDict(
                        {
                            "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
                            "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
                            "gripper_closedness_action": F.Tensor(shape=(1,), dtype=np.float32),
                            "base_displacement_vector": F.Tensor(shape=(2,), dtype=np.float32),
                            "base_displacement_vertical_rotation": F.Tensor(shape=(1,), dtype=np.float32),
                            "terminate_episode": F.Tensor(shape=(3,), dtype=np.int32),
                        }
                    ),
                    "discount": F.Scalar(dtype=np.float32),
                    "reward": F.Scalar(dtype=np.float32),
                    "is_first": F.Scalar(dtype=np.bool_),
                    "is_last": F.Scalar(dtype=np.bool_),
                    "is_terminal": F.Scalar(dtype=np.bool_),
                }
            )
        }
    )
    rng = np.random.default_rng(seed)
    raw, episodes = [], []
    for e in range(n_episodes):
        t_len = int(rng.integers(T[0], T[1] + 1))
        wv = rng.normal(0, 0.1, (t_len, 3)).astype(np.float32)
        rd = rng.normal(0, 0.1, (t_len, 3)).astype(np.float32)
        g = rng.choice([-1.0, 0.0, 0.0, 1.0, 0.05], (t_len, 1)).astype(np.float32)
        pose = rng.normal(0, 1, (t_len, 7)).astype(np.float32)
        closed = rng.integers(0, 2, (t_len, 1)).astype(np.float32)
        inst = INSTRUCTIONS[(e + 1) % len(INSTRUCTIONS)]
        imgs = [_image(rng, hw, t) for t in range(t_len)]
        steps = dict(
            observation=dict(
                image=np.stack(imgs),
                natural_language_instruction=[inst] * t_len,
                natural_language_embedding=np.zeros((t_len, 4), np.float32),
                base_pose_tool_reached=pose,
                gripper_closed=closed,
            ),
            action=dict(
                world_vector=wv,
                rotation_delta=rd,
                gripper_closedness_action=g,
                base_displacement_vector=np.zeros((t_len, 2), np.float32),
                base_displacement_vertical_rotation=np.zeros((t_len, 1), np.float32),
                terminate_episode=np.zeros((t_len, 3), np.int32),
            ),
            **_steps_common(t_len),
        )
        episodes.append({"steps": _as_steps(steps)})
        raw.append(
            dict(
                world_vector=wv,
                rotation_delta=rd,
                gripper=g[:, 0],
                pose=pose,
                closed=closed,
                instruction=inst,
                images=imgs,
            )
        )
    _store("fractal20220817_data", "0.1.0", features, episodes, data_dir)
    return raw


def write_libero(
    data_dir: str,
    name="libero_spatial_no_noops",
    n_episodes=3,
    T=(5, 8),
    hw=(32, 32),
    seed=2,
    image_dtype=np.uint8,
    override=None,
    distinct_wrist=False,
) -> list[dict]:
    """OpenVLA's modified LIBERO RLDS: image, wrist_image, state (8), joint_state (7), action (7).

    `image_dtype` other than uint8 stores raw (wrong-typed) image tensors; `override(e, steps)` may
    edit an episode's step arrays before writing (to plant bad data). `distinct_wrist` stores a
    different wrist image (the step's image flipped upside down and colour-inverted) instead of a copy
    of the primary one; the returned episodes then carry `wrist_images`.
    """
    import tensorflow_datasets as tfds

    F = tfds.features

    def img():
        if image_dtype == np.uint8:
            return F.Image(shape=(*hw, 3), dtype=np.uint8, encoding_format="jpeg")
        return F.Tensor(shape=(*hw, 3), dtype=image_dtype)

    features = F.FeaturesDict(
        {
            "steps": F.Dataset(
                {
                    "observation": F.FeaturesDict(
                        {
                            "image": img(),
                            "wrist_image": img(),
                            "state": F.Tensor(shape=(8,), dtype=np.float32),
                            "joint_state": F.Tensor(shape=(7,), dtype=np.float32),
                        }
                    ),
                    "action": F.Tensor(shape=(7,), dtype=np.float32),
                    "discount": F.Scalar(dtype=np.float32),
                    "reward": F.Scalar(dtype=np.float32),
                    "is_first": F.Scalar(dtype=np.bool_),
                    "is_last": F.Scalar(dtype=np.bool_),
                    "is_terminal": F.Scalar(dtype=np.bool_),
                    "language_instruction": F.Text(),
                }
            ),
            "episode_metadata": F.FeaturesDict({"file_path": F.Text()}),
        }
    )
    rng = np.random.default_rng(seed)
    raw, episodes = [], []
    for e in range(n_episodes):
        t_len = int(rng.integers(T[0], T[1] + 1))
        action = rng.uniform(-0.9, 0.9, (t_len, 7)).astype(np.float32)
        action[:, 6] = rng.choice([-1.0, 1.0], t_len)  # -1 open, +1 close in LIBERO
        state = rng.normal(0, 0.3, (t_len, 8)).astype(np.float32)
        inst = INSTRUCTIONS[(e + 2) % len(INSTRUCTIONS)]
        imgs = [_image(rng, hw, t) for t in range(t_len)]
        ims = np.stack(imgs).astype(image_dtype)
        wrist = (255 - ims[:, ::-1]).astype(image_dtype) if distinct_wrist else ims
        steps = dict(
            observation=dict(image=ims, wrist_image=wrist, state=state, joint_state=np.zeros((t_len, 7), np.float32)),
            action=action,
            language_instruction=[inst] * t_len,
            **_steps_common(t_len),
        )
        if override:
            override(e, steps)
            action, inst = steps["action"], steps["language_instruction"][0]
        episodes.append({"steps": _as_steps(steps), "episode_metadata": {"file_path": f"/libero/{e}"}})
        raw.append(dict(action=action, state=state, instruction=inst, images=imgs))
        if distinct_wrist:
            raw[-1]["wrist_images"] = list(wrist)
    _store(name, "1.0.0", features, episodes, data_dir)
    return raw


def make_cfg(rlds, **kw):
    """A `DataConfig` over the session's tiny RLDS datasets (`tests/data/conftest.py: rlds`)."""
    from openvla_jax.data.rlds import DataConfig

    args = dict(
        data_dir=rlds.dir,
        batch_size=8,
        image_size=32,
        shuffle_buffer=64,
        statistics_dir=rlds.stats_dir,
        process_index=0,
        process_count=1,
        progress=False,
        deterministic=True,
    )
    args.update(kw)
    return DataConfig(**args)
