"""Run a compiled train step on the accelerator it was compiled for, and set what the compiler
predicted beside what the device measured.

`compile_check --target=local --run=N` on a real GPU or TPU host: the abstract train state and batch
of the compile are filled with random values on the device (weights ~ N(0, 0.02), norm scales 1,
optimizer moments 0: the step's arithmetic, not a trained model), the executable runs once to warm
up and `steps` timed times, and the runtime's peak memory is read back. The point is the check of the
deviceless numbers: the compiler's planned peak against `peak_bytes_in_use`, and the analytic FLOPs
against the time (MFU).
"""

from __future__ import annotations

import time

import numpy as np

from openvla_jax.aot.compile import Report


def _value(leaf, key, path: str):
    """The random value of one abstract leaf (traced inside `materialize_state`'s single jit)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(leaf.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.zeros(leaf.shape, dtype)
    if path.endswith("['scale']"):  # RMSNorm / LayerNorm scales: 1, so activations keep their size
        return jnp.ones(leaf.shape, dtype)
    if "opt_state" in path:
        return jnp.zeros(leaf.shape, dtype)
    return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype)


def materialize_state(abstract) -> object:
    """Random device arrays in the shapes, dtypes and shardings of an abstract train state, made by
    one jitted program where each shard lives (a 7B state never passes through the host)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    structs = [leaf for _, leaf in leaves]

    def make(key):
        keys = jax.random.split(key, len(structs))
        return [_value(leaf, k, path) for leaf, k, path in zip(structs, keys, paths)]

    out = jax.jit(make, out_shardings=[leaf.sharding for leaf in structs])(jax.random.key(0))
    return jax.tree_util.tree_unflatten(treedef, out)


def materialize_batch(abstract: dict, action_dim: int = 7) -> dict:
    """A batch in the pipeline's layout (BOS, prompt, action tokens, EOS; labels on the actions) for
    an abstract batch, placed with its sharding."""
    import jax

    from openvla_jax.testing.synthetic import synthetic_batch

    rows, length = abstract["input_ids"].shape
    size = abstract["pixel_values"].shape[1]
    host = synthetic_batch(rows, length, size, action_dim=action_dim)
    host["pixel_values"] = host["pixel_values"][..., : abstract["pixel_values"].shape[-1]]
    rng = np.random.default_rng(1)
    out = {}
    for k, leaf in abstract.items():
        if k in host:
            x = host[k]
        elif k == "dataset_index":
            x = np.zeros(leaf.shape, np.int32)
        else:  # proprio, action (continuous heads): standard normal / clipped to [-1, 1]
            x = np.clip(rng.normal(size=leaf.shape), -1, 1)
        out[k] = jax.device_put(np.asarray(x, dtype=leaf.dtype), leaf.sharding)
    return out


def run_compiled(report: Report, steps: int = 5) -> dict:
    """Execute `report.compiled` (a train step from `compile_train` on `--target=local`) `steps` times
    after one warm-up call. -> measured step time (median, s), tokens/s, MFU against the device's
    dense bf16 peak when known, and the peak bytes in use beside the compiler's planned peak."""
    import jax
    import jax.numpy as jnp

    from openvla_jax.train.flops import peak_flops

    if report.compiled is None or not report.inputs:
        raise ValueError(f"nothing to run: the compile of {report.program} on {report.target} did not succeed")
    devices = jax.devices()
    state, batch = materialize_state(report.inputs[0]), materialize_batch(report.inputs[1])
    expected = jnp.asarray(-1, jnp.int32)  # no step-count check
    times = []
    metrics = None
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = report.compiled(state, batch, expected)
        jax.block_until_ready(metrics)
        if i:  # the first call also loads the executable and warms the allocator
            times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    peak_in_use = max(int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in devices)
    peak = peak_flops(devices[0].device_kind)
    rows, length = report.inputs[1]["input_ids"].shape
    loss = float(np.asarray(metrics["loss"]).reshape(-1)[0]) if metrics and "loss" in metrics else float("nan")
    return dict(
        target=report.target,
        program=report.program,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        rows=rows,
        text_len=length,
        step_s=median,
        step_s_all=[round(t, 4) for t in times],
        rows_per_s=rows / median,
        model_tflops_per_s_per_device=report.flops / median / len(devices) / 1e12,
        mfu=(report.flops / median / len(devices) / peak) if peak else None,
        planned_peak_bytes=report.peak,
        measured_peak_bytes=peak_in_use,
        measured_over_planned=peak_in_use / report.peak if report.peak else None,
        loss=loss,
        finite=bool(np.asarray(metrics.get("finite", True)).all()) if metrics else False,
    )
