"""LIBERO evaluation with OpenVLA's protocol, batched: N environment workers stepped in lockstep,
one batched policy call per step for every live episode.

    from openvla_jax.envs import libero
    vla = libero.load_model("ckpt/openvla-7b-finetuned-libero-spatial")   # protocol preprocessing
    summary = libero.evaluate_libero(libero.openvla_policy(vla, "libero_spatial"), "libero_spatial",
                                     "runs/libero_spatial", workers=8)
    summary["suites"]["libero_spatial"]["success_rate"], ...["ci95"]

The protocol (`libero_protocol.py`): 10 no-op steps, then up to the suite's step limit of policy
steps; 50 trials per task from the suite's initial states; the agent view rotated by 180 degrees,
JPEG round trip + lanczos3 to 224 (+ center crop for models trained with random crops); gripper
mapped to the environment's sign convention. Each environment lives in a spawned worker process
(`libero_workers.py`, no TensorFlow there); a worker that crashes or hangs is replaced and its
episode run again from the start, never counted as a failure. Results are written as each episode
ends and a rerun resumes (`libero_results.py`).

A policy is a function `(images, instructions, wrist=None, proprio=None) -> actions`: images uint8
`[B, 256, 256, 3]` (rotated agent view, before any resize), wrist the same for the hand camera,
proprio `[B, 8]`; actions as the model un-normalises them, `[B, 7]`, or `[B, K, 7]` for a chunk of K
that is executed open loop (the first `execute` of them, default all) before the policy is asked again.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from openvla_jax.envs import libero_protocol as protocol
from openvla_jax.envs import libero_results as results
from openvla_jax.envs.libero_workers import EnvWorker, LiberoBackend, WorkerCrashed
from openvla_jax.utils.files import write_json

TASKS_FILE = "tasks.json"


# ------------------------------------------------------------------------------------------ policies
def load_model(path, center_crop: bool = True, **kw):
    """`OpenVLA.load` with the protocol's image preprocessing: the evaluation resize ("train_jpeg")
    and, with `center_crop` (the original's default: its LIBERO models were trained with random
    crops), the center crop of area 0.9."""
    from openvla_jax.policy import OpenVLA

    crop = protocol.CENTER_CROP_SCALE if center_crop else 0.0
    return OpenVLA.load(path, image_resize=protocol.IMAGE_RESIZE, center_crop=crop, **kw)


def openvla_policy(vla, suite: str, unnorm_key: Optional[str] = None) -> Callable:
    """An `OpenVLA` -> a LIBERO policy function. The model must preprocess as the protocol says
    (`load_model` does that); its `unnorm_key` is the suite's (or `<suite>_no_noops`). A model with
    two images gets (agent view, wrist), one with a proprio token the 8-d state."""
    if vla.image_resize != protocol.IMAGE_RESIZE:
        raise ValueError(
            f"this model resizes images with {vla.image_resize!r}; LIBERO's protocol needs "
            f"{protocol.IMAGE_RESIZE!r}: load it with envs.libero.load_model"
        )
    if vla.num_images not in (1, 2):
        raise ValueError(f"LIBERO has two cameras (agent view, wrist); this model takes {vla.num_images} images")
    if vla.proprio_dim not in (0, protocol.PROPRIO_DIM):
        raise ValueError(f"LIBERO's proprio is {protocol.PROPRIO_DIM}-d; this model takes {vla.proprio_dim}")
    key = unnorm_key or protocol.unnorm_key_for(suite, vla.norm_stats)

    def policy(images, instructions, wrist=None, proprio=None):
        ims = np.asarray(images)
        if vla.num_images == 2:
            ims = np.stack([ims, np.asarray(wrist)], axis=1)
        kw = {"proprio": proprio} if vla.proprio_dim else {}
        return vla.predict_action(ims, list(instructions), unnorm_key=key, **kw)

    policy.wrist = vla.num_images == 2
    policy.proprio = bool(vla.proprio_dim)
    policy.unnorm_key = key
    return policy


def random_policy(seed: int = 0, chunk: int = 0) -> Callable:
    """Uniform random moves in [-1, 1] and a random gripper: a chance baseline and a test stand-in
    (`chunk` > 0: `[B, chunk, 7]` chunks)."""
    rng = np.random.default_rng(seed)

    def policy(images, instructions, wrist=None, proprio=None):
        shape = (len(images), chunk, 7) if chunk else (len(images), 7)
        a = rng.uniform(-1.0, 1.0, shape)
        a[..., -1] = rng.integers(0, 2, shape[:-1])
        return a

    return policy


# --------------------------------------------------------------------------------------- the harness
@dataclass
class _Episode:
    suite: str
    task_id: int
    trial: int
    task: str = ""
    restarts: int = 0
    t0: float = 0.0
    steps: int = 0
    obs: Optional[dict] = None
    queue: list = field(default_factory=list)  # actions of the current chunk not yet executed
    frames: list = field(default_factory=list)

    @property
    def spec(self) -> tuple:
        return (self.suite, self.task_id, self.trial)


def suite_tasks(suite: str, out_dir, make_worker: Callable[[], EnvWorker]) -> list[dict]:
    """The suite's tasks (id, instruction, number of initial states), asked of a worker once and
    cached in `out_dir` (a resumed run that has nothing left to do starts no simulator)."""
    path = Path(out_dir) / f"{suite}.{TASKS_FILE}"
    if path.exists():
        return json.loads(path.read_text())
    worker = make_worker()
    try:
        tasks = worker.call("describe", suite)
    finally:
        worker.close()
    write_json(path, tasks, indent=1)
    return tasks


def evaluate_libero(
    policy: Callable,
    suite: str,
    out_dir,
    tasks: Optional[Sequence[int]] = None,
    trials: int = protocol.TRIALS_PER_TASK,
    workers: int = 4,
    max_steps: Optional[int] = None,
    num_steps_wait: int = protocol.NUM_STEPS_WAIT,
    execute: Optional[int] = None,
    wrist: Optional[bool] = None,
    proprio: Optional[bool] = None,
    resolution: int = protocol.ENV_RESOLUTION,
    record: bool = False,
    settings: Optional[dict] = None,
    make_backend: Optional[Callable] = None,
    timeout: float = 900.0,
    max_restarts: int = 2,
    progress: bool = False,
) -> dict:
    """Run `trials` episodes of each task in `tasks` (default all) of `suite` and write the results in
    `out_dir` (see `libero_results`). Episodes already in `out_dir/episodes.jsonl` are skipped.

    `max_steps` / `num_steps_wait` default to the protocol's (shorter only for tests and
    benchmarks); `wrist` / `proprio` default to the policy's attributes of those names (OFT);
    `settings` are extra facts (checkpoint, center crop) a resumed run must share. `make_backend`
    (tests): a zero-argument picklable factory of a worker backend. Returns the summary, with
    `this_run`: episodes, policy calls and seconds, env steps (wait steps included), env steps/s
    over the whole call, and `steady_steps_per_second`: policy steps/s while every worker was
    stepping (no scene build or reset in the round; the policy's time included)."""
    protocol.check_suite(suite)
    wrist = bool(getattr(policy, "wrist", False) if wrist is None else wrist)
    proprio = bool(getattr(policy, "proprio", False) if proprio is None else proprio)
    limit = protocol.MAX_STEPS[suite] if max_steps is None else int(max_steps)
    if workers < 1 or trials < 1 or limit < 1:
        raise ValueError(f"workers, trials and max_steps must be >= 1, got {workers}, {trials}, {limit}")
    run = dict(
        suite=suite, max_steps=limit, num_steps_wait=num_steps_wait, resolution=resolution, wrist=wrist,
        proprio=proprio, execute=execute, **(settings or {}),
    )  # fmt: skip
    log = results.EpisodeLog(out_dir, run)

    def make_worker() -> EnvWorker:
        backend = make_backend() if make_backend is not None else LiberoBackend(resolution, wrist)
        return EnvWorker(backend, num_steps_wait, wrist, timeout)

    info = suite_tasks(suite, out_dir, make_worker)
    ids = range(len(info)) if tasks is None else [int(t) for t in tasks]
    for t in ids:
        if not 0 <= t < len(info):
            raise ValueError(f"{suite} has tasks 0..{len(info) - 1}, not {t}")
        if trials > info[t]["init_states"]:
            raise ValueError(f"{suite} task {t} has {info[t]['init_states']} initial states, not {trials}")
    done = log.done()
    todo = collections.deque(
        _Episode(suite, t, k, info[t]["task"]) for t in ids for k in range(trials) if (suite, t, k) not in done
    )
    stats = dict(
        episodes=0, policy_calls=0, policy_seconds=0.0, env_steps=0, restarts=0, steady_steps=0, steady_seconds=0.0
    )
    t_start = time.perf_counter()
    pool: list[Optional[EnvWorker]] = [None] * min(workers, len(todo))
    running: list[Optional[_Episode]] = [None] * len(pool)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=suite, unit="ep")

    def finish(i: int, success: bool) -> None:
        ep = running[i]
        assert ep is not None
        rec = dict(
            suite=ep.suite, task_id=ep.task_id, task=ep.task, trial=ep.trial, success=bool(success),
            steps=ep.steps, seconds=round(time.perf_counter() - ep.t0, 3), restarts=ep.restarts,
        )  # fmt: skip
        log.append(rec)
        if record:
            results.save_gif(ep.frames, results.video_path(out_dir, rec))
        running[i] = None
        stats["episodes"] += 1
        if bar is not None:
            bar.update(1)

    def crashed(i: int, err: Exception) -> None:
        """Replace worker i and put its episode back at the front, to run again from its start."""
        w, ep = pool[i], running[i]
        assert w is not None and ep is not None  # a running episode has its worker
        w.close(timeout=2.0)
        pool[i] = None
        running[i] = None
        stats["restarts"] += 1
        if ep.restarts >= max_restarts:
            raise RuntimeError(f"{ep.spec} crashed its worker {ep.restarts + 1} times; last: {err}") from err
        todo.appendleft(_Episode(ep.suite, ep.task_id, ep.trial, ep.task, restarts=ep.restarts + 1))

    try:
        while todo or any(running):
            # One batched policy call for every live episode whose chunk is used up.
            ask = [(ep, ep.obs) for ep in running if ep is not None and ep.obs is not None and not ep.queue]
            if ask:
                eps, last = [ep for ep, _ in ask], [o for _, o in ask]
                kw = {}
                if wrist:
                    kw["wrist"] = np.stack([o["wrist"] for o in last])
                if proprio:
                    kw["proprio"] = np.stack([o["proprio"] for o in last]).astype(np.float32)
                t0 = time.perf_counter()
                acts = np.asarray(policy(np.stack([o["image"] for o in last]), [ep.task for ep in eps], **kw))
                stats["policy_seconds"] += time.perf_counter() - t0
                stats["policy_calls"] += 1
                if acts.ndim == 2:
                    acts = acts[:, None]
                if acts.ndim != 3 or acts.shape[0] != len(eps) or acts.shape[2] != 7:
                    raise ValueError(
                        f"policy returned shape {acts.shape}, expected ({len(eps)}, 7) or ({len(eps)}, K, 7)"
                    )
                for ep, chunk in zip(eps, acts):
                    ep.queue = list(protocol.env_action(chunk[: execute or len(chunk)]))
            # Every worker gets its command, then every answer is collected: they step at once.
            t_iter, sent = time.perf_counter(), []
            for i in range(len(pool)):
                w, ep = pool[i], running[i]
                if ep is None and todo:
                    if w is None or not w.alive():
                        w = pool[i] = make_worker()
                    ep = running[i] = _pick(todo, w.task)
                    ep.t0 = time.perf_counter()
                    cmd, arg = "reset", ep.spec
                elif ep is not None:
                    cmd, arg = "step", ep.queue.pop(0)
                else:
                    continue
                assert w is not None  # a running episode has its worker
                try:
                    w.send(cmd, arg)
                    sent.append((i, cmd))
                except WorkerCrashed as e:
                    crashed(i, e)
            for i, cmd in sent:
                w, ep = pool[i], running[i]
                assert w is not None and ep is not None  # sent to: running, with its worker
                try:
                    obs = w.receive()
                except WorkerCrashed as e:
                    crashed(i, e)
                    continue
                stats["env_steps"] += num_steps_wait if cmd == "reset" else 1
                if cmd == "step":
                    ep.steps += 1
                ep.obs = obs
                if obs["done"] and cmd == "step":
                    finish(i, True)
                elif ep.steps >= limit:
                    finish(i, False)
                elif record:
                    ep.frames.append(obs["image"])
            if sent and all(cmd == "step" for _, cmd in sent):  # steady state: no scene build or reset
                stats["steady_steps"] += len(sent)
                stats["steady_seconds"] += time.perf_counter() - t_iter
    finally:
        for w in pool:
            if w is not None:
                w.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    stats.update(
        seconds=seconds,
        workers=len(pool),
        env_steps_per_second=stats["env_steps"] / max(seconds, 1e-9),
        steady_steps_per_second=stats["steady_steps"] / max(stats["steady_seconds"], 1e-9),
    )
    return results.write_summary(out_dir, log.records, {"this_run": stats})


def _pick(todo: collections.deque, task: Optional[tuple]) -> _Episode:
    """The next episode, preferring one of the task the worker already has built (a new task costs
    a scene build, many seconds)."""
    if task is not None:
        for k, ep in enumerate(todo):
            if (ep.suite, ep.task_id) == tuple(task):
                del todo[k]
                return ep
    return todo.popleft()
