"""`compile_check --target=local --run`: the compiled step executes on the devices it was compiled for,
with values that train, and the measured numbers come back beside the planned ones. Here the local
devices are the 8 CPU devices of the tests (a GPU or TPU host runs the same code)."""

import numpy as np
import pytest


def test_materialized_state_and_batch_are_placed_and_valued_as_planned():
    """The random values: weights ~ N(0, 0.02), norm scales 1, optimizer moments and counters 0,
    each leaf with the abstract leaf's shape, dtype and sharding; the batch in the pipeline's layout."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from openvla_jax.aot.run import materialize_batch, materialize_state

    mesh = jax.make_mesh((8,), ("fsdp",))
    rows, cols = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P(None, "fsdp"))
    sds = jax.ShapeDtypeStruct
    abstract = {
        "params": {
            "dense": {"kernel": sds((64, 256), jnp.float32, sharding=cols)},
            "norm": {"scale": sds((64,), jnp.float32, sharding=rows)},
        },
        "opt_state": {"mu": sds((64, 256), jnp.float32, sharding=cols)},
        "step": sds((), jnp.int32, sharding=NamedSharding(mesh, P())),
        "frozen": sds((64, 256), jnp.bfloat16, sharding=cols),
    }
    state = materialize_state(abstract)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding
    kernel = np.asarray(state["params"]["dense"]["kernel"])
    assert 0.018 < kernel.std() < 0.022 and abs(kernel.mean()) < 0.002
    assert np.all(np.asarray(state["params"]["norm"]["scale"]) == 1)
    assert not np.asarray(state["opt_state"]["mu"]).any() and int(state["step"]) == 0
    assert 0.018 < np.asarray(state["frozen"], np.float32).std() < 0.022

    batch = materialize_batch(
        {
            "pixel_values": sds((8, 32, 32, 6), jnp.float32, sharding=rows),
            "input_ids": sds((8, 16), jnp.int32, sharding=rows),
            "attention_mask": sds((8, 16), jnp.bool_, sharding=rows),
            "labels": sds((8, 16), jnp.int32, sharding=rows),
            "proprio": sds((8, 4), jnp.float32, sharding=rows),
        }
    )
    ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
    assert (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
    assert ((ids[:, -8:-1] >= 31744) & (ids[:, -8:-1] < 32000)).all()  # 7 action tokens, then EOS
    assert (labels[:, :-8] == -100).all() and (labels[:, -8:] == ids[:, -8:]).all()
    assert batch["proprio"].sharding == rows and np.abs(np.asarray(batch["proprio"])).max() <= 1


@pytest.mark.slow  # compiles and runs the tiny train step: minutes on 2 busy cores
def test_compiled_tiny_step_runs_and_reports_measured_beside_planned():
    import jax

    from configs import train as train_configs
    from openvla_jax.aot import compile as C
    from openvla_jax.aot.run import materialize_state, run_compiled
    from openvla_jax.aot.targets import Target

    devices = tuple(jax.devices())
    target = Target("local", "cpu", devices, 64 << 30, devices[0].device_kind)
    config = train_configs.get_config("tiny")
    config.model.scan_layers = True  # a shorter program to compile
    report = C.compile_train(config, target, rows_per_device=1, text_len=16)
    assert report.fits and report.compiled is not None
    state, batch = report.inputs
    assert batch["input_ids"].shape == (len(devices), 16)

    filled = materialize_state(state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(filled), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding, jax.tree_util.keystr(path)
    params = jax.tree.leaves(filled.params)
    assert any(0.01 < float(np.std(np.asarray(p))) < 0.03 for p in params)  # weights ~ N(0, 0.02)
    assert any(np.all(np.asarray(p) == 1) for p in params)  # norm scales 1

    out = run_compiled(report, steps=2)
    assert out["finite"] and np.isfinite(out["loss"]) and out["loss"] > 0
    assert len(out["step_s_all"]) == 2 and out["step_s"] > 0
    assert out["rows"] == len(devices) and out["planned_peak_bytes"] == report.peak
    assert out["mfu"] is None  # no known peak for a CPU
