"""trainer-launch as PID 1: orphaned grandchildren are reaped, not left as zombies (trainer/reaper.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.torchrun import REPO, _loopback_launch
from trainer.reaper import exit_status

WORKER = REPO / "tests" / "support" / "orphan_worker.py"
# A parent that is a child subreaper but never reaps: what the host's init is not, and what a container runtime's
# PID 1 is when it is a program that only waits for its own child. Orphans of trainer-launch's tree land here
# unless trainer-launch reaps them itself.
NEGLECTFUL_PARENT = """
import ctypes, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
sys.exit(subprocess.call(sys.argv[1:]))
"""


def launch_command(report: Path) -> tuple[list[str], dict[str, str]]:
    torchrun, env = _loopback_launch(nproc=1, max_restarts=0, env=None)
    return [sys.executable, "-m", "trainer.launch", *torchrun[3:], str(WORKER), str(report)], env


def test_an_orphaned_grandchild_does_not_stay_a_zombie(tmp_path: Path) -> None:
    report = tmp_path / "orphan.txt"
    command, env = launch_command(report)
    result = subprocess.run([sys.executable, "-c", NEGLECTFUL_PARENT, *command], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report.read_text() == "reaped", f"the orphan was left in state {report.read_text()}"


def _can_unshare_pid() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not _can_unshare_pid(), reason="needs root to make a PID namespace")
def test_as_pid_1_of_its_own_pid_namespace(tmp_path: Path) -> None:
    """The container's situation: trainer-launch is PID 1 and every orphan of the namespace is re-parented to it."""
    report = tmp_path / "orphan.txt"
    command, env = launch_command(report)
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", *command], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report.read_text() == "reaped", f"the orphan was left in state {report.read_text()}"


def test_exit_status_is_what_a_container_runtime_reports() -> None:
    assert exit_status(75 << 8) == 75  # exited 75
    assert exit_status(15) == 128 + 15  # killed by SIGTERM
