"""trainer-launch: real torchrun agents whose workers exit with chosen codes; the pod's exit code follows them."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import pytest

from tests.support.torchrun import REPO, _loopback_launch
from trainer.launch import exit_code_for, with_rendezvous_host

WORKER = REPO / "tests" / "support" / "exit_worker.py"


def launch(*worker_args: str) -> subprocess.Popen[str]:
    torchrun, env = _loopback_launch(nproc=2, max_restarts=0, env=None)
    command = [sys.executable, "-m", "trainer.launch", *torchrun[3:], str(WORKER), *worker_args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


@pytest.mark.parametrize(("codes", "expected"), [
    ("0=0,1=0", 0),
    ("0=0,1=2", 2),  # one rank found a bad config: the Job must fail at once
    ("0=75,1=75", 75),
    ("0=3,1=75", 1),
])
def test_the_pod_exit_code_follows_the_workers(codes: str, expected: int) -> None:
    process = launch(codes)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == expected, output
    assert f"exit {expected}: " in output


def test_sigterm_to_the_launcher_stops_the_workers_and_exits_preempted() -> None:
    process = launch("wait")
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    seen = 0
    while seen < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        seen += "waiting" in line
    assert seen == 2
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 75, output
    assert "stopped by SIGTERM" in output


def test_exit_codes_and_rendezvous_host() -> None:
    assert exit_code_for([]) == 0
    assert exit_code_for([-9, 1]) == 1
    assert exit_code_for([75, 2]) == 2
    args = argparse.Namespace(rdzv_backend="c10d", rdzv_conf="join_timeout=900")
    with_rendezvous_host(args, {"TRAINER_NODE_INDEX": "0"})
    assert args.rdzv_conf == "join_timeout=900,is_host=true"
    args = argparse.Namespace(rdzv_backend="c10d", rdzv_conf="")
    with_rendezvous_host(args, {"TRAINER_NODE_INDEX": "3"})
    assert args.rdzv_conf == "is_host=false"
    args = argparse.Namespace(rdzv_backend="c10d", rdzv_conf="is_host=false")
    with_rendezvous_host(args, {"TRAINER_NODE_INDEX": "0"})  # an explicit choice wins
    assert args.rdzv_conf == "is_host=false"
    with pytest.raises(ValueError, match="TRAINER_NODE_INDEX"):
        with_rendezvous_host(argparse.Namespace(rdzv_backend="c10d", rdzv_conf=""), {"TRAINER_NODE_INDEX": "x"})
