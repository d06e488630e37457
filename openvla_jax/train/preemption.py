"""`PreemptionWatcher`: turn SIGTERM (and optionally SIGINT) into a flag the training loop polls.

    with PreemptionWatcher() as watcher:
        for step in ...:
            state = train_step(state, batch)
            if watcher.should_stop(step):
                checkpointer.save(step, ..., force=True); break

The handler only sets a flag (nothing unsafe runs inside a signal handler); the loop saves at the
end of the current step and exits normally. A second identical signal restores the previous handler
and re-raises the signal, so a stuck job can still be killed with a second Ctrl-C / SIGTERM.

Multi-host: a scheduler may signal only some hosts, and every host must stop at the same step (the
save is collective), so `should_stop` all-gathers the local flags every `sync_every` steps and stops
if any host was signalled. (Installing this handler replaces the SIGTERM notifier of jax's own
preemption service, so `multihost_utils.reached_preemption_sync_point` is not used.)

The same exchange carries a host's `failed` flag (e.g. its checkpoint save failed in the
background): every host then stops at that step and `watcher.failed` tells the loop to raise
rather than save, so no host waits forever in a collective the failed one never reaches.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional, Sequence

import numpy as np


class PreemptionWatcher:
    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *, sync_every: int = 1):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.signals = tuple(signals)
        self.sync_every = sync_every
        self.received: Optional[int] = None  # the first signal number received
        self.failed = False  # some host passed failed=True to should_stop: raise, do not save
        self._previous: dict[int, Any] = {}  # signal number -> the handler signal.signal returned

    # ------------------------------------------------------------------------------------ handlers
    def _handle(self, signum, frame):
        if self.received == signum:  # asked twice: stop waiting for the loop
            self.uninstall()
            signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signum

    def install(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionWatcher must be installed from the main thread (Python delivers signals only there)"
            )
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    # --------------------------------------------------------------------------------------- query
    @property
    def requested(self) -> bool:
        """This host received one of the signals."""
        return self.received is not None

    def should_stop(self, step: int, failed: bool = False) -> bool:
        """True when the loop should stop after `step`; the same answer on every host. It saves
        first unless `self.failed` (then some host passed `failed=True`: the run cannot go on).

        Call it at every step on every host (it is a collective every `sync_every` steps when
        multi-process; a host's `failed` is seen by the others at the next of those)."""
        import jax

        if jax.process_count() == 1:
            self.failed = failed
            return self.requested or failed
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.array([int(self.requested), int(failed)], np.int32)))
        self.failed = bool(np.any(flags.reshape(-1, 2)[:, 1]))
        return bool(np.any(flags))
