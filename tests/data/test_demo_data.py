"""The RLDS writer and the demo data build script (the task itself: tests/envs/test_tabletop.py)."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from openvla_jax.data.rlds_writer import infer_features, write_rlds
from openvla_jax.envs import tabletop
from openvla_jax.tokenizer.prompt import PROMPT_TEMPLATE
from tests.support.rlds_fixtures import load_script


def _toy_episode(rng, i, t):
    return {
        "steps": {
            "observation": {
                "image_0": rng.integers(0, 256, (t, 12, 10, 3), dtype=np.uint8),
                "state": rng.normal(size=(t, 5)).astype(np.float32),
            },
            "action": rng.normal(size=(t, 7)).astype(np.float32),
            "language_instruction": [f"task {i} step {k}" for k in range(t)],
            "is_first": np.arange(t) == 0,
            "is_last": np.arange(t) == t - 1,
            "reward": rng.random(t).astype(np.float32),
        },
        "episode_metadata": {"episode_id": i, "file_path": f"/raw/ep{i}.npy"},
    }


def _read(path, split):
    """All episodes of a split as numpy, steps stacked: list of (steps dict, metadata dict)."""
    out = []
    for ep in tfds.as_numpy(tfds.builder_from_directory(path).as_dataset(split=split)):
        steps = list(ep["steps"])
        stacked = {k: np.stack([s[k] for s in steps]) for k in steps[0] if k != "observation"}
        stacked["observation"] = {k: np.stack([s["observation"][k] for s in steps]) for k in steps[0]["observation"]}
        out.append((stacked, ep["episode_metadata"]))
    return out


def test_writer_round_trip_png(tmp_path):
    rng = np.random.default_rng(0)
    train = [_toy_episode(rng, i, t) for i, t in enumerate([3, 5, 1])]
    val = [_toy_episode(rng, 10 + i, t) for i, t in enumerate([4, 2])]
    path = write_rlds(str(tmp_path), "toy_rlds", {"train": train, "val": val})
    assert path == str(tmp_path / "toy_rlds" / "1.0.0")
    files = sorted(os.listdir(path))
    assert {"dataset_info.json", "features.json"} <= set(files)
    assert any(f.startswith("toy_rlds-train.tfrecord-") for f in files)
    builder = tfds.builder_from_directory(path)
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["val"].num_examples == 2
    image_feat = builder.info.features["steps"]["observation"]["image_0"]
    assert isinstance(image_feat, tfds.features.Image) and image_feat.encoding_format == "png"
    for split, eps in (("train", train), ("val", val)):
        got = _read(path, split)
        assert len(got) == len(eps)
        for (steps, meta), want in zip(got, eps):  # disable_shuffling keeps the given order
            w = want["steps"]
            np.testing.assert_array_equal(steps["observation"]["image_0"], w["observation"]["image_0"])
            assert steps["observation"]["image_0"].dtype == np.uint8
            np.testing.assert_array_equal(steps["observation"]["state"], w["observation"]["state"])
            np.testing.assert_array_equal(steps["action"], w["action"])
            assert steps["action"].dtype == np.float32 and steps["is_first"].dtype == np.bool_
            np.testing.assert_array_equal(steps["is_last"], w["is_last"])
            np.testing.assert_array_equal(steps["reward"], w["reward"])
            assert [s.decode() for s in steps["language_instruction"]] == w["language_instruction"]
            assert meta["episode_id"] == want["episode_metadata"]["episode_id"]
            assert meta["file_path"].decode() == want["episode_metadata"]["file_path"]
    # Images are stored encoded: the raw record holds PNG bytes, not the pixel array.
    raw = next(
        iter(
            tfds.builder_from_directory(path).as_dataset(
                split="train", decoders={"steps": {"observation": {"image_0": tfds.decode.SkipDecoding()}}}
            )
        )
    )
    first = next(iter(raw["steps"]))["observation"]["image_0"].numpy()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_jpeg_val_episodes_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    eps = [_toy_episode(rng, i, 2) for i in range(5)]
    for ep in eps:  # smooth images so JPEG's loss is small
        ep["steps"]["observation"]["image_0"] = np.full(
            (2, 12, 10, 3), 17 * ep["episode_metadata"]["episode_id"] + 40, np.uint8
        )
    ep0_text = eps[0]["steps"]["language_instruction"] = "one instruction for all steps"
    path = write_rlds(str(tmp_path), "toy_jpeg", iter(eps), val_episodes=2, image_format="jpeg")
    train, val = _read(path, "train"), _read(path, "val")
    assert [m["episode_id"] for _, m in train] == [0, 1, 2]
    assert [m["episode_id"] for _, m in val] == [3, 4]  # the last val_episodes go to val
    assert [s.decode() for s in train[0][0]["language_instruction"]] == [ep0_text] * 2
    for (steps, _), ep in zip(train + val, eps):
        diff = np.abs(steps["observation"]["image_0"].astype(int) - ep["steps"]["observation"]["image_0"].astype(int))
        assert diff.max() <= 3, diff.max()
    with pytest.raises(FileExistsError, match="toy_jpeg"):
        write_rlds(str(tmp_path), "toy_jpeg", eps)
    bad = _toy_episode(rng, 0, 3)
    bad["steps"]["action"] = bad["steps"]["action"][:2]
    with pytest.raises(ValueError, match=r"episode 0.*steps/action.*length 2.*T=3"):
        write_rlds(str(tmp_path), "toy_bad", [bad], features=infer_features(_toy_episode(rng, 0, 3)))


def test_make_demo_data_end_to_end(tmp_path, capsys):
    script = load_script("make_demo_data")
    out = script.make_demo_data(str(tmp_path / "demo"), episodes=6, val_fraction=0.34, seed=4)
    manifest = json.load(open(os.path.join(out, "demo_manifest.json")))
    assert (manifest["train_episodes"], manifest["val_episodes"]) == (4, 2)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    path = os.path.join(out, "demo_tabletop", "1.0.0")
    got = _read(path, "train") + _read(path, "val")
    for i, (steps, meta) in enumerate(got):  # the dataset holds exactly what the expert did
        want = tabletop.expert_episode((4, 0, i))
        np.testing.assert_array_equal(steps["action"], want["steps"]["action"])
        np.testing.assert_array_equal(steps["observation"]["image"], want["steps"]["observation"]["image"])
        np.testing.assert_array_equal(steps["observation"]["state"], want["steps"]["observation"]["state"])
        assert steps["language_instruction"][0].decode() == want["steps"]["language_instruction"]
        assert steps["is_last"][-1] and steps["reward"][-1] == 1.0 and steps["is_first"][0]
        assert meta["task"].decode() == want["episode_metadata"]["task"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.id_to_piece(sp.piece_to_id("▁")) == "▁" and sp.piece_to_id("▁") != sp.unk_id()
    prompt = PROMPT_TEMPLATE.format(instruction=want["steps"]["language_instruction"])
    assert sp.decode(sp.encode(prompt)) == prompt
    assert sp.unk_id() not in sp.encode(prompt)
    # Idempotent: a complete build is skipped; --force rebuilds.
    mtime = os.path.getmtime(os.path.join(out, "demo_manifest.json"))
    script.make_demo_data(out, episodes=6, val_fraction=0.34, seed=4)
    assert "already built" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "demo_manifest.json")) == mtime
    script.make_demo_data(out, episodes=3, val_fraction=0.34, seed=4, force=True)
    assert json.load(open(os.path.join(out, "demo_manifest.json")))["episodes"] == 3
    # A build made with other settings, or of an older scene, is stale: rebuilt without --force.
    capsys.readouterr()
    script.make_demo_data(out, episodes=4, val_fraction=0.5, seed=4)
    assert json.load(open(os.path.join(out, "demo_manifest.json")))["episodes"] == 4
    manifest_path = os.path.join(out, "demo_manifest.json")
    manifest = json.load(open(manifest_path))
    json.dump(dict(manifest, scene_version=tabletop.SCENE_VERSION - 1), open(manifest_path, "w"))
    script.make_demo_data(out, episodes=4, val_fraction=0.5, seed=4)
    assert "already built" not in capsys.readouterr().out
    assert json.load(open(manifest_path))["scene_version"] == tabletop.SCENE_VERSION
