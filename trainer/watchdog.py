"""Hang detection: a rank that stops making progress is killed by its own torchrun agent, so the gang re-forms.

A stalled rank (SIGSTOP, a hung collective, a deadlocked loader) would otherwise freeze every rank until the
collective timeout (30 min by default; NCCL's watchdog acts only then). This uses torch elastic's own expiration
timer: the agent (``trainer-launch`` enables it with ``TORCHELASTIC_ENABLE_FILE_TIMER=1``) runs a
``FileTimerServer``, and each worker re-arms one timer per training step and evaluation batch
(``train.hang_timeout_seconds``). When a worker's timer expires, the agent SIGKILLs it (a stopped process too)
and then itself, so the pod exits; the other ranks' collectives fail at once (gloo: connection closed) or their
own timers expire (NCCL), and the group re-forms from the last checkpoint. The same mechanism runs on gloo and
NCCL. The timer's scope names the rank, so the agent's "Reaping worker ... Expired timers" line names it.

Phases where one rank legitimately waits long for another (rank 0's COCOeval, a blocking checkpoint upload) are
``paused``: the collective timeout (``train.timeout_minutes``) still bounds them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

TIMER_FILE_ENV = "TORCHELASTIC_TIMER_FILE"
ENABLE_ENV = "TORCHELASTIC_ENABLE_FILE_TIMER"
_TIMER_LOGGER = "torch.distributed.elastic.timer.file_based_local_timer"


class _StallReporter(logging.Filter):
    """Turns the timer server's "Reaping worker_pid=[N]. Expired timers: [...]" into one line naming the rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Reaping worker_pid") and "detection-trainer rank" in message:
            rank = message.split("detection-trainer rank ", 1)[1].split(":", 1)[0]
            pid = message.split("[", 1)[1].split("]", 1)[0]
            log.error("rank %s stalled (%s): no progress within train.hang_timeout_seconds; its agent kills it "
                      "(pid %s) and this pod, so the group re-forms from the last checkpoint", rank,
                      "stopped, hung in a collective or waiting on a deadlocked loader", pid)
        return record.levelno >= logging.WARNING  # torch's routine INFO lines about the timer are noise


def enable_hang_watchdog(environ: MutableMapping[str, str]) -> None:
    """In the torchrun agent (``trainer-launch``): run torch elastic's timer server, report a stalled rank."""
    environ.setdefault(ENABLE_ENV, "1")
    timer_log = logging.getLogger(_TIMER_LOGGER)
    timer_log.setLevel(logging.INFO)
    timer_log.addFilter(_StallReporter())


class ProgressWatchdog:
    """One re-armable deadline per worker process; a no-op without a torchrun agent's timer server."""

    def __init__(self, timeout_seconds: float, rank: int, stopping: Callable[[], bool] = lambda: False) -> None:
        self.timeout = float(timeout_seconds)
        self._stopping = stopping  # a SIGTERM reached this process: the agent's timer server goes away with it
        self.scope = (f"detection-trainer rank {rank}: no progress for {self.timeout:g} s "
                      "(train.hang_timeout_seconds): stalled")
        self._client = None
        path = os.environ.get(TIMER_FILE_ENV)
        if path and self.timeout > 0:
            from torch.distributed.elastic.timer import FileTimerClient

            self._client = FileTimerClient(path, signal=signal.SIGKILL)
            log.info("hang watchdog: a rank without progress for %g s is stopped by its agent", self.timeout)
        self._armed = False

    @property
    def active(self) -> bool:
        return self._client is not None

    def beat(self) -> None:
        """Progress was made: push this rank's deadline ``timeout`` seconds ahead."""
        if self._client is None:
            return
        try:
            self._client.acquire(self.scope, time.time() + self.timeout)
            self._armed = True
        except (BrokenPipeError, OSError, RuntimeError) as exc:  # the agent's server is gone: nothing to guard
            self._client = None
            if self._stopping():  # the agent got the same signal and shut its server down: expected, not news
                log.info("hang watchdog: off while the run stops (the agent's timer server has shut down)")
            else:
                log.warning("hang watchdog: the agent's timer server is unavailable (%s); hang detection is off",
                            exc)

    def pause(self) -> None:
        """A phase with no per-step progress (waiting for rank 0's COCOeval, a blocking save): no deadline."""
        if self._client is None or not self._armed:
            return
        try:
            self._client.release(self.scope)
            self._armed = False
        except (BrokenPipeError, OSError, RuntimeError):
            self._client = None
