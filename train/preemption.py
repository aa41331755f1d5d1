"""Stopping when asked to: SIGTERM, SIGINT and SIGUSR1 end a run at the next step boundary, checkpointed.

Job schedulers send SIGTERM (Kubernetes, `timeout`, SLURM's --signal and its time limit) or SIGUSR1 (a
common SLURM choice) some time before they kill a job, and Ctrl-C sends SIGINT. The first such signal
only sets a flag: the trainer finishes the optimizer step it is in, writes a checkpoint and exits with
the conventional status 128 + signal number (143, 130, 138), so `--resume` continues bitwise as after
any checkpoint. A second signal acts at once, as if nothing were installed (the last complete
checkpoint stays valid: checkpoints are written atomically). Handlers can only be installed on the
main thread; elsewhere nothing changes.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped at a step boundary because of a signal; its checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint of it is "
                         "written: rerun the same command with --resume to continue")
        self.status = 128 + signum


class Preemption:
    """Within the block, the first of SIGNALS sets `signum` instead of ending the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # The second signal: the handler the process had before, as if we were not here.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        signal.raise_signal(signum)
