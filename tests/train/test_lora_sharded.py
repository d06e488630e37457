"""LoRA through the same sharded machinery as the main train step: on 8 fake CPU devices (mesh
data=2, fsdp=4) two steps give the same losses and the same adapters as on one device (fp32), the
adapters and the frozen base are really sharded there, the base is never donated, and the NaN guard
is sticky as in the main loop. Measured max differences (2 steps): loss 1e-6, adapters 1.4e-6 (SGD with
momentum, lr 0.5; losses 10.377, 10.319)."""

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from openvla_jax.parallel.mesh import AXES, single_device_mesh
from openvla_jax.train import lora as LO
from openvla_jax.train import step as ST
from tests.train.test_lora import BASE, MODULE, make_batch

CFG = LO.LoraConfig(rank=4, alpha=16.0)
BATCHES = [make_batch(b=8, seed=s) for s in (1, 2)]


def optimizer():
    """SGD with momentum (its state mirrors the adapters, so it is sharded like them): the update is
    linear in the gradient, so comparing updates compares gradients. (Adam's first steps are
    lr x sign(g) wherever g != 0, which turns 1e-9 float reassociation noise in a near-zero gradient
    into a whole lr step: not a meaningful comparison between meshes.)"""
    lr = 0.5
    return optax.sgd(lr, momentum=0.9), lambda step: lr


def run(mesh, steps=2, batches=BATCHES):
    """-> (losses, adapters as NumPy, the step function, the final state, the placed base)."""
    tx, schedule = optimizer()
    step = LO.make_lora_train_step(
        MODULE, tx, schedule, CFG, mesh=mesh, supervised_tokens=8, compiler_options=ST.FAST_COMPILE
    )
    base = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx])), BASE, step.base_shardings
    )
    state = LO.init_lora_state(ST.abstract_params(MODULE), CFG, tx, jax.random.key(3), shardings=step.shardings)
    losses = []
    for i in range(steps):
        state, m = step(state, base, batches[i % len(batches)], expected_step=i)
        losses.append(float(m["loss"]))
        assert bool(m["finite"])
    return losses, jax.tree.map(np.asarray, jax.device_get(state.params)), step, state, base


def test_lora_on_data2_fsdp4_equals_one_device():
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), AXES)
    one_losses, one, _, _, _ = run(single_device_mesh())
    losses, sharded, step, state, base = run(mesh)
    # the adapters, their Adam state and the base are sharded over fsdp on that mesh
    specs = [s.spec for s in jax.tree.leaves(step.shardings.params)]
    assert sum("fsdp" in tuple(spec) for spec in specs) >= len(specs) // 2, specs
    some = next(iter(state.params.values()))["A"]
    assert len(some.sharding.device_set) == 8
    assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(base))
    # the frozen base is an argument, neither donated nor changed
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(BASE)):
        np.testing.assert_array_equal(np.asarray(x), y)
    loss_diff = max(abs(a - b) for a, b in zip(losses, one_losses))
    ad_diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)))
    print(
        f"\nLoRA data=2,fsdp=4 vs one device, 2 steps: losses {losses}; "
        f"max |dloss| {loss_diff:.2e}, max |dadapter| {ad_diff:.2e}"
    )
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5, atol=1e-5)
    moved = max(float(np.abs(v["B"]).max()) for v in one.values())
    assert moved > 1e-4  # the adapters did move
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lora_nan_step_leaves_the_state_and_stays_skipped():
    """A non-finite step keeps every leaf; with the loop's expected_step, every later step does too."""
    mesh = single_device_mesh()
    bad = dict(BATCHES[0], pixel_values=BATCHES[0]["pixel_values"] * np.nan)
    _, before, step, state, base = run(mesh, steps=1)
    state, m = step(state, base, bad, expected_step=1)
    assert not bool(m["finite"]) and int(state.step) == 1
    state, m = step(state, base, BATCHES[1], expected_step=2)  # finite, but the run already diverged
    assert bool(m["finite"]) and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
