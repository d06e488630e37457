"""The RLDS writer, the demo tabletop task and the demo data build script."""

import importlib.util
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from openvla_jax.data import demo
from openvla_jax.data.rlds_writer import infer_features, write_rlds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_episode(rng, i, t):
  return {
      "steps": {
          "observation": {"image_0": rng.integers(0, 256, (t, 12, 10, 3), dtype=np.uint8),
                          "state": rng.normal(size=(t, 5)).astype(np.float32)},
          "action": rng.normal(size=(t, 7)).astype(np.float32),
          "language_instruction": [f"task {i} step {k}" for k in range(t)],
          "is_first": np.arange(t) == 0, "is_last": np.arange(t) == t - 1,
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
    stacked["observation"] = {k: np.stack([s["observation"][k] for s in steps])
                              for k in steps[0]["observation"]}
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
  raw = next(iter(tfds.builder_from_directory(path).as_dataset(
      split="train", decoders={"steps": {"observation": {"image_0": tfds.decode.SkipDecoding()}}})))
  first = next(iter(raw["steps"]))["observation"]["image_0"].numpy()
  assert first[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_jpeg_val_episodes_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  eps = [_toy_episode(rng, i, 2) for i in range(5)]
  for ep in eps:  # smooth images so JPEG's loss is small
    ep["steps"]["observation"]["image_0"] = np.full((2, 12, 10, 3), 17 * ep["episode_metadata"]
                                                    ["episode_id"] + 40, np.uint8)
  ep0_text = eps[0]["steps"]["language_instruction"] = "one instruction for all steps"
  path = write_rlds(str(tmp_path), "toy_jpeg", iter(eps), val_episodes=2, image_format="jpeg")
  train, val = _read(path, "train"), _read(path, "val")
  assert [m["episode_id"] for _, m in train] == [0, 1, 2]
  assert [m["episode_id"] for _, m in val] == [3, 4]  # the last val_episodes go to val
  assert [s.decode() for s in train[0][0]["language_instruction"]] == [ep0_text] * 2
  for (steps, _), ep in zip(train + val, eps):
    diff = np.abs(steps["observation"]["image_0"].astype(int)
                  - ep["steps"]["observation"]["image_0"].astype(int))
    assert diff.max() <= 3, diff.max()
  with pytest.raises(FileExistsError, match="toy_jpeg"):
    write_rlds(str(tmp_path), "toy_jpeg", eps)
  bad = _toy_episode(rng, 0, 3)
  bad["steps"]["action"] = bad["steps"]["action"][:2]
  with pytest.raises(ValueError, match=r"episode 0.*steps/action.*length 2.*T=3"):
    write_rlds(str(tmp_path), "toy_bad", [bad], features=infer_features(_toy_episode(rng, 0, 3)))


def test_env_mechanics_by_hand():
  env = demo.DemoTabletopEnv()
  obs = env.reset(123)
  x0 = env.gripper.copy()
  np.testing.assert_array_equal(obs["state"], np.float32([*x0, 1.0]))
  # A too-large action is clipped to one STEP per axis; rotations do nothing.
  obs, r, done, info = env.step(np.array([-1.0, 0.01, 0.0, 3.0, 3.0, 3.0, 1.0]))
  want = np.array([max(x0[0] - demo.STEP, -demo.XY_MAX), x0[1] + 0.01, x0[2]])
  np.testing.assert_allclose(env.gripper, want, atol=1e-12)
  assert info["instruction"] == env.instruction and info["steps"] == 1
  # Grasp then lift a block by hand: put the gripper on block 0 at z=0, close, go up twice.
  env.reset(7)
  env.task, env.target = "pick", 0
  env.gripper[:] = [*env.blocks[0], 0.0]
  env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
  assert env.held == 0 and not env.gripper_open
  env.step(np.array([0, 0, demo.STEP, 0, 0, 0, 0.0]))
  assert not env.success()
  _, r, done, info = env.step(np.array([0, 0, demo.STEP, 0, 0, 0, 0.0]))
  assert info["success"] and done and r == 1.0
  np.testing.assert_allclose(env.blocks[0], env.gripper[:2])
  with pytest.raises(RuntimeError, match="reset"):
    env.step(np.zeros(7))


def test_expert_episode_actions_and_determinism():
  ep = demo.expert_episode((0, 0, 3))
  again = demo.expert_episode((0, 0, 3))
  other = demo.expert_episode((0, 0, 4))
  s = ep["steps"]
  np.testing.assert_array_equal(s["observation"]["image"], again["steps"]["observation"]["image"])
  np.testing.assert_array_equal(s["action"], again["steps"]["action"])
  assert not np.array_equal(s["observation"]["image"][0], other["steps"]["observation"]["image"][0])
  # Replaying the recorded actions in a fresh env reproduces the recorded frames and succeeds.
  env = demo.DemoTabletopEnv()
  obs = env.reset((0, 0, 3))
  for t, a in enumerate(s["action"][:-1]):
    np.testing.assert_array_equal(obs["image"], s["observation"]["image"][t])
    np.testing.assert_array_equal(obs["state"], s["observation"]["state"][t])
    obs, _, done, info = env.step(a)
  assert done and info["success"]
  # Each action dim takes values on {-STEP, 0, STEP} (xyz), 0 (rotation), {0, 1} (gripper).
  acts = np.concatenate([demo.expert_episode((5, 0, i))["steps"]["action"] for i in range(40)])
  step = np.float32(demo.STEP)
  assert set(np.unique(acts[:, :3]).tolist()) == {-step, 0.0, step}
  assert not acts[:, 3:6].any() and set(np.unique(acts[:, 6])) == {0.0, 1.0}


def test_action_is_a_function_of_image_and_instruction():
  """The pixel-reading expert reproduces the privileged expert on every frame."""
  for i in range(25):
    s = demo.expert_episode((1, 0, i))["steps"]
    t = len(s["action"])
    pred = demo.image_expert_policy(s["observation"]["image"], [s["language_instruction"]] * t)
    np.testing.assert_allclose(pred, s["action"], atol=1e-6, err_msg=f"episode {i}")


def test_closed_loop_expert_full_success_random_near_zero():
  expert = demo.evaluate_policy(demo.image_expert_policy, n_episodes=40, seed=0, batch_size=16)
  assert expert["success_rate"] == 1.0 and expert["n_episodes"] == 40
  assert set(expert["success_rate_by_task"]) == {"move", "pick"}
  assert max(expert["lengths"]) <= 14
  calls = []

  def random_recording(images, instructions):
    calls.append(images.shape)
    return demo.random_policy(0)(images, instructions)

  rand = demo.evaluate_policy(random_recording, n_episodes=40, seed=0, batch_size=16)
  assert rand["success_rate"] <= 0.1, rand["success_rate"]
  assert set(calls) == {(16, 128, 128, 3)}  # one fixed batch shape for a jitted policy
  a = demo.evaluate_policy(demo.random_policy(3), n_episodes=10, seed=2)
  b = demo.evaluate_policy(demo.random_policy(3), n_episodes=10, seed=2)
  assert a == b
  with pytest.raises(ValueError, match="shape"):
    demo.evaluate_policy(lambda im, ins: np.zeros((1, 7)), n_episodes=2)


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "make_demo_data", os.path.join(ROOT, "scripts", "make_demo_data.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_make_demo_data_end_to_end(tmp_path, capsys):
  script = _load_script()
  out = script.make_demo_data(str(tmp_path / "demo"), episodes=6, val_fraction=0.34, seed=4)
  manifest = json.load(open(os.path.join(out, "demo_manifest.json")))
  assert (manifest["train_episodes"], manifest["val_episodes"]) == (4, 2)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  path = os.path.join(out, "demo_tabletop", "1.0.0")
  got = _read(path, "train") + _read(path, "val")
  for i, (steps, meta) in enumerate(got):  # the dataset holds exactly what the expert did
    want = demo.expert_episode((4, 0, i))
    np.testing.assert_array_equal(steps["action"], want["steps"]["action"])
    np.testing.assert_array_equal(steps["observation"]["image"],
                                  want["steps"]["observation"]["image"])
    np.testing.assert_array_equal(steps["observation"]["state"],
                                  want["steps"]["observation"]["state"])
    assert steps["language_instruction"][0].decode() == want["steps"]["language_instruction"]
    assert steps["is_last"][-1] and steps["reward"][-1] == 1.0 and steps["is_first"][0]
    assert meta["task"].decode() == want["episode_metadata"]["task"]
  sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
  assert sp.id_to_piece(sp.piece_to_id("▁")) == "▁" and sp.piece_to_id("▁") != sp.unk_id()
  prompt = script.PROMPT.format(want["steps"]["language_instruction"])
  assert sp.decode(sp.encode(prompt)) == prompt
  assert sp.unk_id() not in sp.encode(prompt)
  # Idempotent: a complete build is skipped; --force rebuilds.
  mtime = os.path.getmtime(os.path.join(out, "demo_manifest.json"))
  script.make_demo_data(out, episodes=6, val_fraction=0.34, seed=4)
  assert "already built" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(out, "demo_manifest.json")) == mtime
  script.make_demo_data(out, episodes=3, val_fraction=0.34, seed=4, force=True)
  assert json.load(open(os.path.join(out, "demo_manifest.json")))["episodes"] == 3
