"""Multi-process start-up: `jax.distributed.initialize` when asked for, a no-op otherwise.

A run is multi-process when `num_processes` > 1 is given, or the environment says so
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, as set by a launcher). On TPU pods and
SLURM/Open MPI clusters `jax.distributed.initialize()` detects everything itself: pass `auto=True`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

_initialized = False


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def maybe_initialize(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    auto: bool = False,
    cpu_collectives: str = "gloo",
) -> bool:
    """Join the process group if multi-process is requested; returns True when initialised (now or
    before). Idempotent. Must run before anything touches `jax.devices()`.

    `cpu_collectives`: the CPU backend needs a collectives implementation for cross-process ops."""
    global _initialized
    if _initialized:
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not auto and (num_processes is None or num_processes <= 1):
        return False
    if not auto and (coordinator is None or process_id is None):
        raise ValueError(
            f"multi-process run ({num_processes} processes) needs a coordinator address and a "
            f"process id (got coordinator={coordinator!r}, process_id={process_id}); set "
            "JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID or pass them"
        )
    # Only affects the CPU client (cross-process ops on CPU arrays); harmless on GPU / TPU runs.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    _initialized = True
    return True
