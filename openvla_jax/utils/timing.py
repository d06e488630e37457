"""Wall-clock measurement for benchmarks: warm up, repeat, report the median."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, block=None) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs.

    `block(result)` waits for asynchronous work (e.g. `jax.block_until_ready`) before the clock stops.
    """
    block = block or (lambda r: r)
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
