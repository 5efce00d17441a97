"""SIGTERM/SIGINT → a stop request the training loop honours at the next step boundary.

Kubernetes eviction, ``kubectl delete`` and spot reclaim send SIGTERM (torchrun passes it to the whole process
group) and allow ``terminationGracePeriodSeconds`` before SIGKILL. The handler only records the request; the loop
finishes the step, all ranks agree to stop, commit a checkpoint and exit with ``EXIT_PREEMPTED``. A second
SIGINT (Ctrl-C twice) aborts at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

log = logging.getLogger(__name__)


class StopSignal:
    def __init__(self) -> None:
        self.received: str | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None:
            self.received, self.at = name, time.monotonic()
            log.warning("%s received: finishing this step, then saving a checkpoint and exiting", name)

    @property
    def requested(self) -> bool:
        return self.received is not None
