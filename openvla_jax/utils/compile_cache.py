"""A persistent XLA compilation cache: a second run with the same programs loads them instead of compiling.

    from openvla_jax.utils.compile_cache import enable_compilation_cache
    enable_compilation_cache(config.get("compilation_cache_dir"))   # or OPENVLA_JAX_COMPILATION_CACHE=dir

A 7B train step takes minutes to compile on a TPU pod or GPU; restarts after preemption, evaluation
jobs and servers pay it again without a cache. Entries are keyed by the program, the compiler options
and the device kind, so a stale entry is never used for a different program.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

ENV_VAR = "OPENVLA_JAX_COMPILATION_CACHE"
HIT_EVENT = "/jax/compilation_cache/cache_hits"


def cache_dir_from(path: Optional[str] = None) -> Optional[str]:
    """The cache directory: `path` if given, else $OPENVLA_JAX_COMPILATION_CACHE, else jax's own
    $JAX_COMPILATION_CACHE_DIR, else None (no cache)."""
    return path or os.environ.get(ENV_VAR) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def enable_compilation_cache(
    path: Optional[str] = None, min_compile_secs: float = 0.0, min_entry_bytes: int = 0
) -> Optional[str]:
    """Turn on jax's persistent cache at `cache_dir_from(path)`; returns the directory (None: left off).

    By default jax caches only programs that took over 1 s to compile; we cache every program
    (`min_compile_secs=0`), since a run compiles few and each small one still costs a trace+compile
    on restart. Call before the first jit compiles (earlier compiles are simply not cached)."""
    path = cache_dir_from(path)
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_bytes))
    return path


class CacheHits:
    """Counts persistent-cache hits in this process (jax's monitoring event), e.g. to log or test them.

    hits = CacheHits(); f(x); print(hits.count)
    """

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs):
        if event == HIT_EVENT:
            self.count += 1
