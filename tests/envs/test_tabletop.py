"""The bundled tabletop task: mechanics, the rendering's geometry, the expert, the pixel-reading expert."""

import numpy as np
import pytest

from openvla_jax.envs import tabletop as T


def test_env_mechanics_by_hand():
    env = T.TabletopEnv()
    obs = env.reset(123)
    np.testing.assert_array_equal(obs["state"], np.float32([*env.gripper, env.gripper_open]))
    env.gripper[:], env.held, env.gripper_open = [0.0, 0.0, T.STEP], -1, True
    # Moves are whole grid steps, the nearest to the command, at most one per axis (a too-large
    # action is clipped, 0.01 is no step, 0.03 is one); rotations do nothing.
    obs, r, done, info = env.step(np.array([-1.0, 0.01, 0.03, 3.0, 3.0, 3.0, 1.0]))
    np.testing.assert_allclose(env.gripper, [-T.STEP, 0.0, 2 * T.STEP], atol=1e-12)
    np.testing.assert_allclose(obs["state"], [-T.STEP, 0.0, 2 * T.STEP, 1.0], atol=1e-7)
    assert info["instruction"] == env.instruction and info["steps"] == 1
    # Grasp then lift a block by hand: put the gripper on block 0 at z=0, close, go up twice.
    env.reset(7)
    env.task, env.target, env.held, env.gripper_open = "pick", 0, -1, True
    env.gripper[:] = [*env.blocks[0], 0.0]
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    assert env.held == 0 and not env.gripper_open
    env.step(np.array([0, 0, T.STEP, 0, 0, 0, 0.0]))
    assert not env.success()
    _, r, done, info = env.step(np.array([0, 0, T.STEP, 0, 0, 0, 0.0]))
    assert info["success"] and done and r == 1.0
    np.testing.assert_allclose(env.blocks[0], env.gripper[:2])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7))
    env.reset(1)
    with pytest.raises(ValueError, match="7 finite floats"):
        env.step(np.array([np.nan] * 7))
    # Closing in the air grasps nothing.
    env.reset(7)
    env.held, env.gripper_open = -1, True
    env.gripper[:] = [*env.blocks[0], 2 * T.STEP]
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    assert env.held == -1 and not env.gripper_open


def test_rendering_is_the_view_from_the_gripper():
    """The camera follows the gripper through a wide-angle lens: a block t cells away is drawn at
    `lens(t)`, the central third shows the cell under the gripper and the outer thirds the
    directions; the ring's thickness is the height and its colour open/closed."""
    third = T.IMAGE_SIZE // 3
    np.testing.assert_allclose(T.lens([0.0, 0.5, -0.5, 6.0]), [T.C, T.C + third / 2, T.C - third / 2, T.C + 60])
    np.testing.assert_allclose(T.lens_inverse(T.lens(np.arange(-6.0, 6.5, 0.5))), np.arange(-6.0, 6.5, 0.5), atol=1e-9)
    assert np.all(np.diff(T.lens(np.arange(-7.0, 7.5, 0.5))) > 0)  # monotone: the order of things is kept
    assert T.lens(1.0) - T.BLOCK_H > T.C + third / 2  # a block one cell away lies outside the central third
    env = T.TabletopEnv()
    env.reset(3)
    env.held, env.gripper_open = -1, True
    env.gripper[:] = [0.0, 0.0, 3 * T.STEP]
    env.blocks = np.array([[T.STEP, -2 * T.STEP], [-3 * T.STEP, 3 * T.STEP], [0.0, 0.0]])
    env.colors = list(T.COLORS)  # three blocks here, one of each colour
    img = env.observation()["image"]
    for (bx, by), color in zip(env.blocks, env.colors):
        r, c = np.nonzero((img == T.COLORS[color]).all(-1))
        centre = np.array([(c.min() + c.max()) / 2, (r.min() + r.max()) / 2])
        np.testing.assert_allclose(centre, np.round(T.lens(np.array([bx, by]) / T.STEP)), atol=0.5)
        assert (c.max() - c.min(), r.max() - r.min()) == (2 * T.BLOCK_H,) * 2  # nothing hides it here
        # which third the block is in = the sign of its offset: what the expert's move is
        np.testing.assert_array_equal(centre // third - 1, np.sign([bx, by]))
    # Open ring, 2 + 2 * 3 px thick at z = 3 levels, all inside the central third.
    top = (img[T.C - T.RING_OUT : T.C, T.C] == T.OPEN).all(-1)
    assert top[:8].all() and not top[8:].any()
    assert T.RING_OUT < third / 2
    # Moving the gripper one cell right moves the block under it into the left third.
    env.gripper[0] += T.STEP
    c = np.nonzero((env.observation()["image"] == T.COLORS[env.colors[2]]).all(-1))[1]
    assert c.max() < third
    # Closed at z = 0 on a block: it is held, drawn inside a thin black ring.
    env.gripper[:] = [*env.blocks[0], 0.0]
    env.step(np.array([0, 0, 0, 0, 0, 0, 0.0]))
    img = env.observation()["image"]
    assert env.held == 0 and (img[T.C, T.C] == T.COLORS[env.colors[0]]).all()
    top = (img[T.C - T.RING_OUT : T.C, T.C] == T.CLOSED).all(-1)
    assert top[:2].all() and not top[2:].any()
    assert (img[0, 0] == T.FLOOR).all() and (img == T.TABLE).all(-1).sum() > 1000


def test_expert_episode_actions_and_determinism():
    ep = T.expert_episode((0, 0, 3))
    again = T.expert_episode((0, 0, 3))
    other = T.expert_episode((0, 0, 4))
    s = ep["steps"]
    np.testing.assert_array_equal(s["observation"]["image"], again["steps"]["observation"]["image"])
    np.testing.assert_array_equal(s["action"], again["steps"]["action"])
    assert not np.array_equal(s["observation"]["image"][0], other["steps"]["observation"]["image"][0])
    # Replaying the recorded actions in a fresh env reproduces the recorded frames and succeeds.
    env = T.TabletopEnv()
    obs = env.reset((0, 0, 3))
    for t, a in enumerate(s["action"][:-1]):
        np.testing.assert_array_equal(obs["image"], s["observation"]["image"][t])
        np.testing.assert_array_equal(obs["state"], s["observation"]["state"][t])
        obs, _, done, info = env.step(a)
    assert done and info["success"]
    # Each action dim takes values on {-STEP, 0, STEP} (xyz), 0 (rotation), {0, 1} (gripper).
    eps = [T.expert_episode((5, 0, i)) for i in range(40)]
    acts = np.concatenate([e["steps"]["action"] for e in eps])
    step = np.float32(T.STEP)
    assert set(np.unique(acts[:, :3]).tolist()) == {-step, 0.0, step}
    assert not acts[:, 3:6].any() and set(np.unique(acts[:, 6])) == {0.0, 1.0}
    assert max(len(e["steps"]["action"]) for e in eps) <= 11
    assert {e["episode_metadata"]["task"] for e in eps} == set(T.TASKS)


def test_action_is_a_function_of_image_and_instruction():
    """The pixel-reading expert reproduces the privileged expert on every frame."""
    for i in range(40):
        s = T.expert_episode((1, 0, i))["steps"]
        t = len(s["action"])
        pred = T.image_expert_policy(s["observation"]["image"], [s["language_instruction"]] * t)
        np.testing.assert_array_equal(pred, s["action"], err_msg=f"episode {i}")
    with pytest.raises(ValueError, match="not a demo instruction"):
        T.parse_instruction("fly to the moon")
    with pytest.raises(ValueError, match=r"\[126,126,3\]"):
        T.parse_image(np.zeros((64, 64, 3), np.uint8))


def test_half_the_episodes_start_at_a_block_not_named():
    """START_ON_OTHER: above (or, for "pick", holding) a block the instruction does not name; the
    expert leaves it, releasing it first, and still succeeds."""
    on_other = holding = 0
    for i in range(400):
        env = T.TabletopEnv()
        env.reset((9, 0, i))
        d = np.abs(env.blocks - env.gripper[:2]).max(1)
        if (np.delete(d, env.target) < 1e-9).any():
            on_other += 1
            holding += env.held not in (-1, env.target)
        if env.held >= 0:
            assert env.held != env.target and not env.gripper_open and env.task == "pick"
            assert env.expert()[6] == 1.0  # first: open, let go of the wrong block
        assert T.expert_episode((9, 0, i))["steps"]["reward"][-1] == 1.0
    assert abs(on_other / 400 - T.START_ON_OTHER) < 0.08, on_other
    assert 0.07 < holding / 400 < 0.19, holding  # 1/2 x 1/2 ("pick") x 1/2
