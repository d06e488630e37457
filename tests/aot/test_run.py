"""`compile_check --target=local --run`: the compiled step executes on the devices it was compiled for,
with values that train, and the measured numbers come back beside the planned ones. Here the local
devices are the 8 CPU devices of the tests (a GPU or TPU host runs the same code)."""

import numpy as np


def test_compiled_tiny_step_runs_and_reports_measured_beside_planned():
    import jax

    from configs import train as train_configs
    from openvla_jax.aot import compile as C
    from openvla_jax.aot.run import materialize_state, run_compiled
    from openvla_jax.aot.targets import Target

    devices = tuple(jax.devices())
    target = Target("local", "cpu", devices, 64 << 30, devices[0].device_kind)
    config = train_configs.get_config("tiny")
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
