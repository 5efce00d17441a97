"""trainer-launch: real torchrun agents whose workers exit with chosen codes; the pod's exit code follows them."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.support.torchrun import REPO, _loopback_launch
from trainer.launch import exit_code_for, retry_seconds, with_rendezvous_host
from trainer.local_s3 import free_port

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
    try:
        deadline = time.monotonic() + 60
        waiting: set[str] = set()
        printed = ""
        while len(waiting) < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            printed += line
            waiting.update(re.findall(r"worker (\d) waiting", line))
        assert waiting == {"0", "1"}, printed
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 75, output
        assert "stopped by SIGTERM" in output
    finally:
        if process.poll() is None:  # a failed assertion must not leave the agent running (workers end in 60 s)
            process.kill()
            process.wait(timeout=30)


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
    assert retry_seconds({}) == 600 and retry_seconds({"TRAINER_RDZV_RETRY_SECONDS": "30"}) == 30
    with pytest.raises(ValueError, match="TRAINER_RDZV_RETRY_SECONDS='soon'"):
        retry_seconds({"TRAINER_RDZV_RETRY_SECONDS": "soon"})


def test_a_node_that_starts_before_the_rendezvous_host_retries_and_joins() -> None:
    """A replacement pod can start before pod 0 listens again: it retries instead of failing (exit 0 for both)."""
    port = free_port()
    _, env = _loopback_launch(nproc=1, max_restarts=0, env=None)

    def node(index: int) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "trainer.launch", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=retry-test", "--rdzv-conf=read_timeout=2",
                   "--local-addr=127.0.0.1", "--max-restarts=0", "--monitor-interval=0.5", str(WORKER), "0=0,1=0"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env={**env, "TRAINER_NODE_INDEX": str(index), "TRAINER_RDZV_RETRY_SECONDS": "60"})
    late_joiner = node(1)
    assert late_joiner.stdout is not None
    early: list[str] = []
    refused = threading.Event()

    def watch() -> None:  # the late joiner's output until it has failed once to reach the store
        for line in late_joiner.stdout:  # type: ignore[union-attr]
            early.append(line)
            if "not ready" in line:
                refused.set()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # A fixed sleep was not enough on a loaded machine: starting Python and torch can take longer than it.
    assert refused.wait(90), "".join(early)
    watcher.join(timeout=10)
    host = node(0)
    host_output, _ = host.communicate(timeout=120)
    rest, _ = late_joiner.communicate(timeout=120)
    output = "".join(early) + rest
    assert host.returncode == 0, host_output
    assert late_joiner.returncode == 0, output
    assert "not ready" in output and "retrying" in output


def test_the_retry_window_is_bounded() -> None:
    _, env = _loopback_launch(nproc=1, max_restarts=0, env=None)
    command = [sys.executable, "-m", "trainer.launch", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=read_timeout=1", "--local-addr=127.0.0.1",
               str(WORKER), "0=0"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**env, "TRAINER_NODE_INDEX": "1", "TRAINER_RDZV_RETRY_SECONDS": "4"})
    assert result.returncode == 1, result.stderr
    assert "rendezvous" in result.stderr and time.monotonic() - started < 60
