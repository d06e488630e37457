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


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5, block=None, rounds: bool = True
) -> dict[str, float]:
    """Median wall time of each `fns[name]()`. -> {name: seconds}.

    rounds=True: timed in rounds (one call of each per round), so every function sees the same
    background load: on a shared machine a ratio of two medians taken minutes apart measures the
    neighbours, not the code. rounds=False: each function warmed up and timed in its own block, so no
    function runs right after another's (a PyTorch train step leaves the next XLA step on this CPU up
    to 1.9x slower; measured in BENCHMARKS.md)."""
    block = block or (lambda r: r)
    if not rounds:
        return {name: median_seconds(fn, warmup=warmup, repeats=repeats, block=block) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
