"""Closed-loop evaluation in the bundled tabletop task (`envs/tabletop.py`), in lockstep batches.

    r = closed_loop(OpenVLA.load("runs/demo/export"), n_episodes=128, seed=0, record=4)
    r["success_rate"], r["ci95"], r["agreement"]    # 0.9, (0.84, 0.94), {"x": 0.97, ...}
    closed_loop(tabletop.image_expert_policy, n_episodes=128)       # the reference: 100 %
    closed_loop(tabletop.random_policy(0), n_episodes=128)          # the chance baseline

One policy call serves every live episode of a batch (finished and padding episodes ride along
with their last frame, so a jitted model compiles once per batch size). A policy that returns
action chunks `[B, K, 7]` has the first `execute` (default all K) actions of each chunk carried out
open-loop before it is asked again, as OpenVLA-OFT runs its chunks. Episode i is seeded
(seed, 1, i): disjoint from the dataset's episodes (seed, 0, i).

At every executed step the scripted expert's action for the same state is recorded beside the
policy's, so the result says per action dimension how often the policy did what the expert would
have done (`agreement`: the sign of each move, the gripper's open/close) and which dimension fails.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence, Union, cast

import numpy as np

from openvla_jax.envs import tabletop

PolicyFn = Callable[..., np.ndarray]  # uint8 [B,H,W,3], B str[, proprio [B,4]] -> [B, 7] or [B, K, 7]
DIMS = ("x", "y", "z", "gripper")


def wants_proprio(policy) -> bool:
    return bool(getattr(policy, "proprio_dim", 0))


def as_policy_fn(policy, unnorm_key: Optional[str] = tabletop.DATASET_NAME) -> PolicyFn:
    """An `OpenVLA` (anything with `predict_action`) -> a batched policy function; functions pass.
    A model with a proprio token gets the env's state (x, y, z, open) as its proprio."""
    if hasattr(policy, "predict_action"):

        def policy_fn(images: np.ndarray, instructions: Sequence[str], proprio=None) -> np.ndarray:
            kw = {"proprio": proprio} if proprio is not None else {}
            return np.asarray(policy.predict_action(images, list(instructions), unnorm_key=unnorm_key, **kw))

        return policy_fn
    if not callable(policy):
        raise TypeError(
            f"policy must be an OpenVLA or a function (images, instructions) -> actions, got {type(policy).__name__}"
        )
    return cast(PolicyFn, policy)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a success rate; (0, 1) for n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def action_signs(actions: np.ndarray) -> np.ndarray:
    """float [..., 7] -> int [..., 4]: the sign of each xyz move (0 below half a step: the env's
    grid tolerance) and the gripper command (1 open, 0 closed), the quantities the task scores."""
    a = np.asarray(actions, np.float64)
    move = np.where(np.abs(a[..., :3]) > tabletop.STEP / 2, np.sign(a[..., :3]), 0.0)
    return np.concatenate([move, (a[..., 6:7] > 0.5)], axis=-1).astype(np.int64)


def closed_loop(
    policy: Union[PolicyFn, object],
    n_episodes: int = 128,
    seed: int = 0,
    batch_size: Optional[int] = None,
    unnorm_key: Optional[str] = tabletop.DATASET_NAME,
    max_steps: int = tabletop.MAX_STEPS,
    execute: Optional[int] = None,
    record: int = 0,
    progress: bool = False,
) -> dict:
    """Run `policy` for `n_episodes` seeded episodes. Returns:

    success_rate, ci95 (Wilson), episodes, successes [N] bool, steps [N] (steps taken; success
    ends an episode early), mean_steps, success_rate_by_task {task: rate}, policy_calls (batched
    calls), calls_per_episode (mean calls an episode took part in), agreement {x, y, z, gripper}
    and agreement_by_task (fraction of executed steps where the policy's action matches the
    expert's in that dimension), seconds, and `recorded`: the first `record` episodes frame by
    frame (images, instruction, policy and expert actions, success), for `evaluate.filmstrip`.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if execute is not None and execute < 1:
        raise ValueError(f"execute must be >= 1 (actions of each chunk to run), got {execute}")
    fn = as_policy_fn(policy, unnorm_key)
    with_proprio = wants_proprio(policy)
    bs = batch_size or min(n_episodes, 64)
    t0 = time.perf_counter()
    successes = np.zeros(n_episodes, bool)
    lengths = np.zeros(n_episodes, np.int64)
    calls_per = np.zeros(n_episodes, np.int64)
    tasks = [""] * n_episodes
    agree = {t: np.zeros(len(DIMS)) for t in tabletop.TASKS}
    counted = {t: 0 for t in tabletop.TASKS}
    recorded: list[dict[str, Any]] = [dict(frames=[], policy=[], expert=[]) for _ in range(min(record, n_episodes))]
    calls = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_episodes, desc="closed loop", unit="ep", leave=False)
    for start in range(0, n_episodes, bs):
        ids = [min(start + j, n_episodes - 1) for j in range(bs)]  # pad by repeating the last one
        envs = [tabletop.TabletopEnv(max_steps) for _ in ids]
        obs = [env.reset((seed, 1, i)) for env, i in zip(envs, ids)]
        active = np.array([start + j < n_episodes for j in range(bs)])
        chunk, used = None, 0
        while active.any():
            if chunk is None or used >= min(execute or chunk.shape[1], chunk.shape[1]):
                args = [np.stack([o["image"] for o in obs]), [o["instruction"] for o in obs]]
                if with_proprio:
                    args.append(np.stack([o["state"] for o in obs]).astype(np.float32))
                chunk = np.asarray(fn(*args))
                calls += 1
                calls_per[[ids[j] for j in np.nonzero(active)[0]]] += 1
                if chunk.ndim == 2:
                    chunk = chunk[:, None]
                if chunk.ndim != 3 or chunk.shape[0] != bs or chunk.shape[2] != 7:
                    raise ValueError(f"policy returned shape {chunk.shape}, expected ({bs}, 7) or ({bs}, K, 7)")
                used = 0
            actions = chunk[:, used]
            used += 1
            for j in np.nonzero(active)[0]:
                i, env = ids[j], envs[j]
                want = env.expert()
                same = action_signs(actions[j]) == action_signs(want)
                agree[env.task] += same
                counted[env.task] += 1
                if i < len(recorded):
                    rec = recorded[i]
                    rec["frames"].append(obs[j]["image"])
                    rec["policy"].append(np.asarray(actions[j], np.float64))
                    rec["expert"].append(want.astype(np.float64))
                obs[j], _, done, info = env.step(actions[j])
                if done:
                    active[j] = False
                    successes[i], lengths[i], tasks[i] = info["success"], info["steps"], info["task"]
                    if i < len(recorded):
                        recorded[i].update(
                            final=obs[j]["image"],
                            instruction=info["instruction"],
                            success=bool(info["success"]),
                            steps=int(info["steps"]),
                        )
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    total = sum(counted.values())
    agreement = {d: float(sum(agree[t][k] for t in agree) / max(total, 1)) for k, d in enumerate(DIMS)}
    by_task_agree = {
        t: {d: float(agree[t][k] / counted[t]) for k, d in enumerate(DIMS)} for t in tabletop.TASKS if counted[t]
    }
    by_task = {
        t: float(successes[[k for k in range(n_episodes) if tasks[k] == t]].mean())
        for t in tabletop.TASKS
        if t in tasks
    }
    n_ok = int(successes.sum())
    return {
        "success_rate": n_ok / n_episodes,
        "ci95": wilson_interval(n_ok, n_episodes),
        "episodes": n_episodes,
        "successes": successes.tolist(),
        "steps": lengths.tolist(),
        "mean_steps": float(lengths.mean()),
        "success_rate_by_task": by_task,
        "policy_calls": calls,
        "calls_per_episode": float(calls_per.mean()),
        "agreement": agreement,
        "agreement_by_task": by_task_agree,
        "seconds": time.perf_counter() - t0,
        "recorded": recorded,
    }
