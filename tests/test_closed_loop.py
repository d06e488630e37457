"""Closed-loop success in the demo environment: the scripted expert (acting from pixels) scores 100%,
a random policy about 0, an OpenVLA-like object is stepped with one batched predict_action call per
env step, and a random tiny OpenVLA runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import model as model_configs
from openvla_jax.data import demo
from openvla_jax.evaluate.closed_loop import as_policy_fn, closed_loop_success

N = 24


def test_expert_scores_100_percent_and_random_about_0():
    expert = closed_loop_success(demo.image_expert_policy, n_episodes=N, seed=0, batch_size=8)
    assert expert["success_rate"] == 1.0 and expert["episodes"] == N
    assert all(expert["successes"]) and max(expert["steps"]) < demo.MAX_STEPS  # done early, not timed out
    assert set(expert["success_rate_by_task"]) == {"move", "pick"}  # both tasks were drawn
    rand = closed_loop_success(demo.random_policy(0), n_episodes=N, seed=0, batch_size=8)
    assert rand["success_rate"] <= 0.1, rand["success_rate"]
    assert rand["mean_steps"] > 20  # random episodes run (nearly) to the step limit


def test_seeds_are_reproducible_and_independent_of_batch_size():
    a = closed_loop_success(demo.random_policy(3), n_episodes=6, seed=5, batch_size=6)
    b = closed_loop_success(demo.image_expert_policy, n_episodes=6, seed=5, batch_size=4)
    c = closed_loop_success(demo.image_expert_policy, n_episodes=6, seed=5, batch_size=6)
    assert b["steps"] == c["steps"]  # same episodes whatever the batching
    assert a["episodes"] == 6 and len(a["steps"]) == 6


class ExpertVLA:
    """Duck-typed OpenVLA whose predict_action is the expert; records every call."""

    def __init__(self):
        self.calls = []

    def predict_action(self, images, instructions, unnorm_key=None):
        self.calls.append((len(images), unnorm_key))
        return demo.image_expert_policy(np.asarray(images), instructions).astype(np.float64)


def test_an_openvla_gets_one_batched_call_per_env_step():
    vla = ExpertVLA()
    r = closed_loop_success(vla, n_episodes=8, seed=1, batch_size=8, unnorm_key="demo_tabletop")
    assert r["success_rate"] == 1.0
    # lockstep: one call for all 8 episodes per step, until the longest episode ends
    assert vla.calls == [(8, "demo_tabletop")] * max(r["steps"])
    with pytest.raises(TypeError, match="OpenVLA or a function"):
        as_policy_fn(42)


def test_random_tiny_openvla_runs(tmp_path):
    """Smoke: the real model path (preprocess, prompt, jitted decode, unnormalise) in the loop."""
    import importlib.util
    from pathlib import Path

    from flax import linen as nn

    from openvla_jax import OpenVLA
    from openvla_jax.models import vla as vla_lib
    from openvla_jax.train.step import abstract_params

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_demo_data", root / "scripts" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.make_demo_data(str(tmp_path / "demo"), episodes=3, val_fraction=0.34, seed=0)  # for its tokenizer
    cfg = model_configs.get_config("tiny")
    cfg.vision.image_size = 56
    module = vla_lib.from_config(cfg, dtype=jnp.float32)
    shapes = abstract_params(module)  # the model's param shapes, no memory used
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), nn.meta.unbox(shapes))
    stats = {"demo_tabletop": {"action": {"q01": [-0.05] * 6 + [0], "q99": [0.05] * 6 + [1],
                                          "mask": [True] * 6 + [False]}}}
    vla = OpenVLA(cfg, params, stats, data, "float32")
    r = closed_loop_success(vla, n_episodes=4, seed=0, batch_size=4, max_steps=5)
    assert 0.0 <= r["success_rate"] <= 1.0 and r["episodes"] == 4
    assert all(1 <= s <= 5 for s in r["steps"])
