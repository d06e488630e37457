"""jax starts on the CPU without CUDA/TPU noise where no accelerator exists, and only there."""

import os
import subprocess
import sys
from pathlib import Path

from openvla_jax.utils import platforms

ROOT = Path(__file__).resolve().parents[2]


def test_the_choice_is_left_to_the_user_and_to_hosts_with_accelerators(monkeypatch):
    calls = []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not platforms.default_to_cpu_without_accelerators()  # the user chose
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(platforms.glob, "glob", lambda p: ["/dev/nvidia0"] if p.startswith("/dev/nvidia") else [])
    assert not platforms.default_to_cpu_without_accelerators()  # a GPU host
    monkeypatch.setattr(platforms.glob, "glob", lambda p: ["/dev/accel0"] if p.startswith("/dev/accel") else [])
    assert not platforms.default_to_cpu_without_accelerators()  # a TPU VM
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platforms.glob, "glob", lambda p: calls.append(p) or [])
    assert not platforms.default_to_cpu_without_accelerators()  # not Linux: Metal etc. are not files


def test_a_host_without_accelerators_starts_quietly_on_the_cpu():
    """A fresh process (the aot extra's libtpu and CUDA plugin are installed in `make test`'s venv):
    no CUDA traceback, no TPU runtime error, CPU devices."""
    code = "import os, openvla_jax, jax; print(os.environ['JAX_PLATFORMS'], jax.devices()[0].platform)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    if platforms.has_accelerator_devices():  # this machine has one: nothing was chosen for it
        return
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "Traceback" not in out.stderr and "Unable to load CUDA" not in out.stderr
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr
