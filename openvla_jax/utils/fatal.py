"""End a CLI on a fatal training error with its cause as the last line of output.

After a failed asynchronous save, the writes still in flight fail again while the interpreter shuts
down, each with a traceback (hundreds at 7B, from C++ callbacks as well as Python threads) that would
bury the one line a person needs. `exit_with_cause` prints that line, then sends stderr to /dev/null.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 3  # what train.py / finetune.py return on a fatal training error


def fatal_errors() -> tuple:
    """The errors a training CLI ends on with its cause (divergence, a failed save, a locked work dir)."""
    from openvla_jax.checkpoints.training import CheckpointError
    from openvla_jax.train.lock import WorkdirLocked
    from openvla_jax.train.loop import TrainingDiverged

    return (TrainingDiverged, CheckpointError, WorkdirLocked)


def exit_with_cause(program: str, error: BaseException) -> int:
    """Print `<program>: <Type>: <cause>` to stderr, silence the teardown, return the exit code."""
    print(f"{program}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    sys.stderr = open(devnull, "w", closefd=False)
    return EXIT_CODE
