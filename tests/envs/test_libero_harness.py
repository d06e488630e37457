"""The batched LIBERO harness without the simulator: a stand-in backend in real spawned worker
processes checks lockstep stepping, one policy call per step, chunks run open loop, results written
and resumed, a worker killed mid-episode replaced and its episode re-run, and the protocol's
action and key conventions by hand. (`test_libero.py` runs the real LIBERO.)"""

import json
import os

import numpy as np
import pytest

from openvla_jax.envs import libero, libero_protocol, libero_results

TASK_STEPS = {0: None, 1: 3}  # task 1 reaches its goal after 3 policy steps; task 0 never


class FakeBackend:
    """LIBERO's observation keys, no physics. Optionally dies (a real process exit) at its
    `crash_at`-th step, once: the first worker to get there leaves `marker` behind."""

    def __init__(self, wait: int, marker: str = "", crash_at: int = 0):
        self.wait, self.marker, self.crash_at = wait, marker, crash_at
        self.n = 0

    def describe(self, suite):
        return [{"task_id": t, "task": f"do task {t}", "init_states": 50} for t in TASK_STEPS]

    def reset(self, spec):
        self.spec, self.n = spec, 0
        return self._obs()

    def step(self, action):
        assert len(action) == 7 and action[-1] in (-1.0, 1.0)  # the gripper arrives binarised
        self.n += 1
        if self.crash_at and self.n == self.crash_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(9)
        goal = TASK_STEPS[self.spec[1]]
        return self._obs(), goal is not None and self.n >= self.wait + goal

    def _obs(self):
        img = np.zeros((8, 8, 3), np.uint8)
        img[0, 0] = (self.spec[1], self.spec[2], self.n)  # top-left; the worker's rotation moves it
        return {
            "agentview_image": img,
            "robot0_eye_in_hand_image": img,
            "robot0_eef_pos": np.zeros(3),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.zeros(2),
            "language": f"do task {self.spec[1]}",
        }

    def set_joint_qpos(self, values):
        pass

    def close(self):
        pass


class Recorder:
    """A chunked random policy that records what it was given."""

    def __init__(self, chunk=0):
        self.inner, self.calls = libero.random_policy(0, chunk), []

    def __call__(self, images, instructions, wrist=None, proprio=None):
        self.calls.append((np.asarray(images).copy(), list(instructions), proprio))
        return self.inner(images, instructions)


def run(tmp_path, policy, backend=None, **kw):
    args = dict(tasks=[0, 1], trials=3, workers=2, max_steps=5, num_steps_wait=2, timeout=60)
    args.update(kw)
    backend = backend or FakeBackend(args["num_steps_wait"])
    return libero.evaluate_libero(policy, "libero_goal", tmp_path, make_backend=lambda: backend, **args)


def test_lockstep_results_and_resume(tmp_path):
    pol = Recorder()
    s = run(tmp_path, pol)
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted((r["task_id"], r["trial"]) for r in lines) == [(t, k) for t in (0, 1) for k in range(3)]
    by = {(r["task_id"], r["trial"]): r for r in lines}
    assert all(not by[0, k]["success"] and by[0, k]["steps"] == 5 for k in range(3))  # ran to the limit
    assert all(by[1, k]["success"] and by[1, k]["steps"] == 3 for k in range(3))  # stopped at the goal
    assert set(lines[0]) == {"suite", "task_id", "task", "trial", "success", "steps", "seconds", "restarts"}
    task = s["suites"]["libero_goal"]["tasks"]
    assert task["0"]["success_rate"] == 0.0 and task["1"]["success_rate"] == 1.0 and task["1"]["task"] == "do task 1"
    assert s["overall"]["episodes"] == 6 and s["overall"]["successes"] == 3
    assert s["overall"]["ci95"] == pytest.approx(list(libero.results.wilson_interval(3, 6)))
    assert (tmp_path / "success.png").stat().st_size > 1000
    # Lockstep: every call holds every live episode (2 workers); 6 episodes of 5 or 3 steps.
    assert max(len(c[1]) for c in pol.calls) == 2 and sum(len(c[1]) for c in pol.calls) == 3 * 5 + 3 * 3
    assert s["this_run"]["env_steps"] == 3 * 5 + 3 * 3 + 6 * 2  # policy steps + wait steps
    # The frame the policy sees is rotated by 180 degrees: the marked pixel is now bottom-right.
    img, instr, _ = pol.calls[0]
    assert img.shape[1:] == (8, 8, 3) and img[0, -1, -1, 2] == 2 and instr[0].startswith("do task")
    # Resumed: nothing to do, no worker started, the summary unchanged.
    again = run(tmp_path, Recorder())
    assert again["this_run"]["episodes"] == 0 and again["this_run"]["workers"] == 0
    assert again["overall"] == s["overall"]
    with pytest.raises(ValueError, match="other settings"):
        run(tmp_path, Recorder(), max_steps=6)


def test_chunks_run_open_loop_and_proprio_and_wrist_reach_the_policy(tmp_path):
    pol = Recorder(chunk=4)
    s = run(tmp_path, pol, tasks=[0], trials=2, max_steps=6, execute=3, wrist=True, proprio=True)
    assert s["overall"]["episodes"] == 2
    assert len(pol.calls) == 2  # 6 steps = 2 chunks of 3 executed actions, both episodes per call
    assert pol.calls[0][2].shape == (2, libero_protocol.PROPRIO_DIM)


def test_a_killed_worker_is_replaced_and_its_episode_run_again(tmp_path):
    backend = FakeBackend(2, marker=str(tmp_path / "crashed"), crash_at=4)
    s = run(tmp_path / "out", Recorder(), backend=backend)
    lines = [json.loads(x) for x in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and len({(r["task_id"], r["trial"]) for r in lines}) == 6  # each once
    assert sum(r["restarts"] for r in lines) == 1 and s["restarts"] == 1 and s["this_run"]["restarts"] == 1
    rerun = next(r for r in lines if r["restarts"])
    assert rerun["steps"] == (3 if rerun["task_id"] == 1 else 5)  # the re-run is a whole episode
    assert s["overall"]["successes"] == 3


def test_protocol_conventions_by_hand():
    a = libero_protocol.env_action([[0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0], [0, 0, 0, 0, 0, 0, 0.0]])
    np.testing.assert_array_equal(a[:, -1], [-1.0, 1.0])  # model open (1) -> env -1; closed (0) -> +1
    np.testing.assert_array_equal(a[0, :6], [0.1, -0.2, 0.3, 0.0, 0.5, -0.5])
    assert libero_protocol.env_action([0, 0, 0, 0, 0, 0, 0.7])[-1] == -1.0  # binarised: above 0.5 is open
    assert libero_protocol.unnorm_key_for("libero_10", {"libero_10_no_noops": {}}) == "libero_10_no_noops"
    assert libero_protocol.unnorm_key_for("libero_10", {"libero_10": {}, "libero_10_no_noops": {}}) == "libero_10"
    with pytest.raises(KeyError, match="neither"):
        libero_protocol.unnorm_key_for("libero_goal", {"bridge_orig": {}})
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        libero_protocol.check_suite("libero_100")
    half_turn_z = [0.0, 0.0, 1.0, 0.0]  # (x, y, z, w): 180 degrees about z
    np.testing.assert_allclose(libero_protocol.quat_to_axis_angle(half_turn_z), [0, 0, np.pi])
    np.testing.assert_array_equal(libero_protocol.quat_to_axis_angle([0, 0, 0, 1.0]), np.zeros(3))
    assert [libero_protocol.MAX_STEPS[s] for s in libero_protocol.SUITES] == [220, 280, 300, 520, 400]
    assert libero_results.summarize([])["overall"]["episodes"] == 0


class FakeVLA:
    """Duck-typed OpenVLA (the attributes `openvla_policy` reads) that records its calls."""

    def __init__(self, num_images=1, proprio_dim=0, image_resize="train_jpeg"):
        self.num_images, self.proprio_dim, self.image_resize = num_images, proprio_dim, image_resize
        self.norm_stats = {"libero_spatial_no_noops": {}, "bridge_orig": {}}
        self.calls = []

    def predict_action(self, images, instructions, unnorm_key=None, proprio=None):
        self.calls.append((np.shape(images), unnorm_key, None if proprio is None else np.shape(proprio)))
        return np.zeros((len(instructions), 8, 7) if self.num_images == 2 else (len(instructions), 7))


def test_openvla_policy_wires_cameras_proprio_and_the_suite_key():
    vla = FakeVLA()
    pol = libero.openvla_policy(vla, "libero_spatial")
    assert pol.unnorm_key == "libero_spatial_no_noops" and not pol.wrist and not pol.proprio
    img = np.zeros((3, 16, 16, 3), np.uint8)
    assert pol(img, ["a", "b", "c"]).shape == (3, 7)
    assert vla.calls[-1] == ((3, 16, 16, 3), "libero_spatial_no_noops", None)
    oft = FakeVLA(num_images=2, proprio_dim=8)
    pol = libero.openvla_policy(oft, "libero_spatial")
    assert pol.wrist and pol.proprio
    assert pol(img, ["a"] * 3, wrist=img, proprio=np.zeros((3, 8))).shape == (3, 8, 7)
    assert oft.calls[-1] == ((3, 2, 16, 16, 3), "libero_spatial_no_noops", (3, 8))
    with pytest.raises(ValueError, match="load_model"):
        libero.openvla_policy(FakeVLA(image_resize="processor"), "libero_spatial")
    with pytest.raises(KeyError, match="neither"):
        libero.openvla_policy(vla, "libero_goal")
