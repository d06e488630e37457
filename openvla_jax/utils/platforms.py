"""Start jax on the CPU without noise on a Linux host that has no accelerator.

With the `aot` extra installed (libtpu and the CUDA plugin, for compiling ahead of time), jax tries
every backend it finds at start-up: on a machine without a GPU or TPU it prints a CUDA traceback and
TPU runtime errors before it falls back to the CPU, which reads as a broken install. When nobody chose
(JAX_PLATFORMS unset) and the host has none of the device files those accelerators need, choose the
CPU; a host with a GPU or TPU, or a user's JAX_PLATFORMS, is left alone.
"""

from __future__ import annotations

import glob
import os
import sys

ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel*", "/dev/vfio/[0-9]*", "/dev/kfd")


def has_accelerator_devices() -> bool:
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def default_to_cpu_without_accelerators() -> bool:
    """Set jax's platform to "cpu" when nothing was chosen and no accelerator exists (Linux only: other
    systems expose theirs differently). Returns whether it did. Too late once a backend has started."""
    if os.environ.get("JAX_PLATFORMS") or not sys.platform.startswith("linux") or has_accelerator_devices():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: the env var was read; set the option itself
        import jax

        jax.config.update("jax_platforms", "cpu")
    return True
