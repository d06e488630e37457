"""LIBERO environments in spawned worker processes, one environment each.

Why processes: TensorFlow (the policy's image resize) and Mesa's software renderer in one process
segfault (two LLVM copies), and a simulator that dies must not take the evaluation with it. A worker
is started with the `spawn` method (a fresh interpreter, nothing inherited from the parent) and
imports only NumPy, `envs.libero_protocol` and the simulator; `worker_main` checks that TensorFlow
never got in.

    w = EnvWorker(LiberoBackend(resolution=256))
    obs = w.reset(("libero_goal", 7, 0))       # suite, task id, trial: the protocol's wait steps done
    obs = w.step(action)                         # {"image", "wrist"?, "proprio", "done", "instruction"}
    w.close()

Every call waits at most `timeout` seconds; a worker that dies or hangs raises `WorkerCrashed`, and
the caller starts a new one (`libero.evaluate_libero` then re-runs the episode from its start).

A backend is a picklable object made in the parent and used in the worker: `reset(spec) -> obs`,
`step(action) -> (obs, done)`, `set_joint_qpos({joint: value})`, `describe(suite)`, `close()`,
where obs is the simulator's observation dict (the worker's `raw_observation` returns the last
one as it is). `LiberoBackend` is the real one; tests pass their own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from openvla_jax.envs import libero_protocol as protocol

FORBIDDEN_MODULES = ("tensorflow",)


class WorkerCrashed(RuntimeError):
    """The worker process died, hung past its timeout, or its simulator raised."""


class LiberoBackend:
    """One LIBERO `OffScreenRenderEnv`, built in the worker for a task and kept while the worker
    stays on that task (the original also keeps one environment per task, resetting it per trial)."""

    def __init__(self, resolution: int = protocol.ENV_RESOLUTION, wrist: bool = False):
        self.resolution, self.wrist = resolution, wrist
        self._env, self._task, self._suites = None, None, {}

    def _suite(self, suite: str):
        if suite not in self._suites:
            os.environ.setdefault("MUJOCO_GL", "egl")
            os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
            from libero.libero import benchmark

            self._suites[suite] = benchmark.get_benchmark_dict()[protocol.check_suite(suite)]()
        return self._suites[suite]

    def describe(self, suite: str) -> list[dict]:
        """The suite's tasks: [{"task_id", "task" (the instruction), "init_states" (how many)}]."""
        s = self._suite(suite)
        return [
            {"task_id": i, "task": s.get_task(i).language, "init_states": len(s.get_task_init_states(i))}
            for i in range(s.n_tasks)
        ]

    def reset(self, spec: Sequence) -> dict:
        suite, task_id, trial = spec
        s = self._suite(suite)
        if self._task != (suite, task_id):
            self.close()
            from libero.libero import get_libero_path
            from libero.libero.envs import OffScreenRenderEnv

            task = s.get_task(task_id)
            cameras = ["agentview"] + (["robot0_eye_in_hand"] if self.wrist else [])  # one render, not two
            self._env = OffScreenRenderEnv(
                bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
                camera_heights=self.resolution,
                camera_widths=self.resolution,
                camera_names=cameras,
            )
            self._env.seed(protocol.ENV_SEED)  # the original: the seed moves objects even with a fixed state
            self._task, self._language = (suite, task_id), task.language
        env = self._env
        assert env is not None  # built above, or kept from the last reset of this task
        env.reset()
        obs = env.set_init_state(s.get_task_init_states(task_id)[trial])
        obs = dict(obs, language=self._language)
        return obs

    def step(self, action) -> tuple[dict, bool]:
        env = self._env
        assert env is not None, "step before reset"
        obs, _, done, _ = env.step(np.asarray(action, np.float64).tolist())
        return dict(obs, language=self._language), bool(done)

    def set_joint_qpos(self, values: dict) -> None:
        """Test hook: put joints (objects' free joints take a 7-d pose) where a goal holds."""
        env = self._env
        assert env is not None, "set_joint_qpos before reset"
        for name, value in values.items():
            env.sim.data.set_joint_qpos(name, value)
        env.sim.forward()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._task = None, None


def _message(obs: dict, done: bool, wrist: bool) -> dict:
    """The simulator's observation -> what the policy side needs (rotated frames, proprio)."""
    out = {
        "image": protocol.camera_frame(obs, protocol.AGENTVIEW_KEY),
        "proprio": protocol.proprio_state(obs),
        "done": bool(done),
        "instruction": obs.get("language", ""),
    }
    if wrist:
        out["wrist"] = protocol.camera_frame(obs, protocol.WRIST_KEY)
    return out


def worker_main(conn, backend, num_steps_wait: int, wrist: bool) -> None:
    """The worker's loop: one command in, one ("ok", value) or ("error", text) out. A reset runs the
    protocol's wait steps (no-op actions) before returning the first observation the policy sees."""
    obs = None
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except EOFError:
                break
            if cmd == "close":
                break
            try:
                if cmd == "reset":
                    obs, done = backend.reset(arg), False
                    for _ in range(num_steps_wait):
                        obs, done = backend.step(protocol.NOOP_ACTION)
                    value = _message(obs, done, wrist)
                elif cmd == "step":
                    obs, done = backend.step(arg)
                    value = _message(obs, done, wrist)
                elif cmd == "raw_observation":  # the simulator's last observation as it gave it
                    value = obs
                elif cmd == "set_joint_qpos":
                    value = backend.set_joint_qpos(arg)
                elif cmd == "describe":
                    value = backend.describe(arg)
                elif cmd == "modules":
                    value = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN_MODULES)
                else:
                    raise ValueError(f"unknown worker command {cmd!r}")
                bad = [m for m in FORBIDDEN_MODULES if m in sys.modules]
                if bad:
                    raise ImportError(f"{bad} got imported in an environment worker: Mesa and TF segfault together")
                conn.send(("ok", value))
            except Exception as e:  # reported to the parent, which restarts this worker
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        try:
            backend.close()
        except Exception:
            pass


class EnvWorker:
    """A spawned process owning one environment backend. Calls block until the worker answers."""

    def __init__(
        self,
        backend: Any = None,
        num_steps_wait: int = protocol.NUM_STEPS_WAIT,
        wrist: bool = False,
        timeout: float = 900.0,
    ):
        ctx = mp.get_context("spawn")
        self.backend = backend if backend is not None else LiberoBackend(wrist=wrist)
        self.timeout = timeout
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=worker_main, args=(child, self.backend, num_steps_wait, wrist), daemon=True, name="libero-env"
        )
        self.process.start()
        child.close()
        self.task: Optional[tuple] = None  # (suite, task id) of the last reset
        self._waiting: Optional[str] = None

    # Split in send / receive so a pool steps all its workers at once.
    def send(self, cmd: str, arg=None) -> None:
        try:
            self._conn.send((cmd, arg))
        except (OSError, EOFError) as e:
            raise WorkerCrashed(f"worker {self.process.pid} is gone ({e})") from None
        self._waiting = cmd
        if cmd == "reset":
            assert arg is not None  # reset's arg: the episode spec (suite, task id, trial)
            self.task = tuple(arg[:2])

    def receive(self, timeout: Optional[float] = None):
        cmd, self._waiting = self._waiting, None
        try:
            ready = self._conn.poll(self.timeout if timeout is None else timeout)
            if not ready:
                raise WorkerCrashed(f"worker {self.process.pid} gave no answer to {cmd!r} in {self.timeout:.0f} s")
            status, value = self._conn.recv()
        except (OSError, EOFError):
            self.process.join(1.0)
            raise WorkerCrashed(f"worker {self.process.pid} died (exit code {self.process.exitcode}) during {cmd!r}")
        if status != "ok":
            raise WorkerCrashed(f"worker {self.process.pid}, {cmd!r}: {value}")
        return value

    def call(self, cmd: str, arg=None):
        self.send(cmd, arg)
        return self.receive()

    def reset(self, spec) -> dict:
        return self.call("reset", tuple(spec))

    def step(self, action) -> dict:
        return self.call("step", np.asarray(action, np.float64))

    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop; kill it if it does not (a crashed or hung one)."""
        if self.process.is_alive():
            try:
                self._conn.send(("close", None))
            except (OSError, EOFError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()
