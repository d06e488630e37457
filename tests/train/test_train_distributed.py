"""Two processes on this machine joined by `jax.distributed.initialize` (localhost coordinator, CPU
gloo collectives), one CPU device each, train the same steps as one process with two devices and the
same global batch: same losses, gradient norms and parameters."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

RUNNER = Path(__file__).resolve().parents[1] / "support" / "dist_runner.py"
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_two_processes_train_like_one():
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(RUNNER), "2", str(i), coordinator, str(STEPS)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    multi = _rows(outs[0][0])
    single = _rows(
        subprocess.run(
            [sys.executable, str(RUNNER), "1", "0", "-", str(STEPS)],
            env=_env(2),
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    )
    assert [r["processes"] for r in multi] == [2] * STEPS and [r["processes"] for r in single] == [1] * STEPS
    assert multi[0]["devices"] == single[0]["devices"] == 2
    for a, b in zip(multi, single):
        for k in ("loss", "grad_norm", "param_sq"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
    assert multi[0]["loss"] != multi[-1]["loss"]  # the steps really train
