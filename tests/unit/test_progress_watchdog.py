"""The per-rank hang watchdog when its agent's timer server is gone: expected during a stop (the agent got the same
SIGTERM and shut it down), worth a warning otherwise. Uses torch elastic's real FileTimerClient on a timer file
that no server reads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trainer.watchdog import TIMER_FILE_ENV, ProgressWatchdog


@pytest.mark.parametrize("stopping", [False, True])
def test_a_gone_timer_server_turns_the_watchdog_off_with_a_warning_only_outside_a_stop(
        stopping: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(TIMER_FILE_ENV, str(tmp_path / "no-server-reads-this"))
    caplog.set_level(logging.INFO, logger="trainer.watchdog")
    watchdog = ProgressWatchdog(30, rank=0, stopping=lambda: stopping)
    assert watchdog.active
    watchdog.beat()
    assert not watchdog.active  # nothing to guard any more: later beats cost nothing
    ours = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "trainer.watchdog"]
    off = [(level, text) for level, text in ours if "hang watchdog: off" in text or "unavailable" in text]
    assert off == [(logging.INFO if stopping else logging.WARNING, off[0][1])]
    watchdog.beat()
    assert len([r for r in caplog.records if r.name == "trainer.watchdog"]) == len(ours)  # said once
