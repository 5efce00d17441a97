"""The run lease (trainer.lease): one job owns a run; the same job takes its lease back; a stale, released,
damaged or dead-holder lease may be taken over; a job that lost it can write nothing more. Every case runs on a
local folder and on the real S3 server (moto, conditional PUTs) on loopback."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import S3Env
from trainer import storage
from trainer.checkpoint import LATEST, CheckpointWriter, Snapshot, checkpoints_uri, list_checkpoints
from trainer.lease import LEASE, Holder, LeaseLost, RunLease, RunLeaseHeld


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    s3: S3Env = request.getfixturevalue("s3")
    return s3.uri("runs/r")


def lease(run_uri: str, job: str, clock: Clock, ttl: float = 60, host: str = "node-a", pid: int = 1) -> RunLease:
    return RunLease(run_uri, ttl, Holder(job, host, pid), clock=clock)


def test_a_second_job_is_refused_with_the_holder_and_the_lease_age(run_uri: str) -> None:
    clock = Clock()
    lease(run_uri, "job:a", clock).acquire()
    clock.now += 7
    with pytest.raises(RunLeaseHeld) as refused:
        lease(run_uri, "job:b", clock).acquire()
    message = str(refused.value)
    assert run_uri in message and "job:a on node-a" in message and "renewed 7 s ago" in message
    assert len(message.splitlines()) == 1


def test_the_same_job_takes_its_own_lease_back(run_uri: str) -> None:
    clock = Clock()
    first = lease(run_uri, "job:a", clock, host="pod-0")
    first.acquire()
    again = lease(run_uri, "job:a", clock, host="pod-0-replacement").acquire()  # a restarted pod of the same Job
    again.fence()
    with pytest.raises(LeaseLost):
        first.fence()  # the old pod, should it still run, may not write any more


def test_a_stale_lease_is_taken_over_and_its_old_holder_can_no_longer_write(
        run_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    old = lease(run_uri, "job:a", clock, ttl=60).acquire()
    clock.now += 30
    with pytest.raises(RunLeaseHeld):
        lease(run_uri, "job:b", clock).acquire()
    clock.now += 31  # 61 s without renewal
    lease(run_uri, "job:b", clock).acquire()
    assert "stale" in caplog.text and "job:a" in caplog.text
    with pytest.raises(LeaseLost, match="lost its run lease to job:b"):
        old.fence()


def test_renewing_keeps_the_lease_and_release_frees_it(run_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    held = lease(run_uri, "job:a", clock, ttl=60).acquire()
    for _ in range(3):
        clock.now += 50
        held.fence()  # each renewal moves the deadline
    with pytest.raises(RunLeaseHeld):
        lease(run_uri, "job:b", clock).acquire()
    held.release()
    lease(run_uri, "job:b", clock).acquire()
    # a released lease is free: taking it is routine (every resume after a preemption), not a warning
    taken = [record for record in caplog.records if "taken over" in record.getMessage()]
    assert [(record.levelno, "released by" in record.getMessage()) for record in taken] == [(logging.INFO, True)]


def test_a_damaged_lease_or_a_dead_holder_on_this_host_is_taken_over(run_uri: str) -> None:
    clock = Clock()
    storage.write_bytes(storage.join(run_uri, LEASE), b"{not json")
    lease(run_uri, "job:a", clock).acquire()
    gone = subprocess.Popen(["true"])  # a pid that has just exited
    gone.wait()
    storage.delete(storage.join(run_uri, LEASE))
    lease(run_uri, "job:a", clock, host=Holder.here().host, pid=gone.pid).acquire()
    lease(run_uri, "job:b", clock, host=Holder.here().host).acquire()  # a local kill -9: no TTL wait


def test_racing_jobs_leave_exactly_one_owner(run_uri: str) -> None:
    clock = Clock()
    winners: list[str] = []
    refused: list[str] = []

    def start(job: str) -> None:
        try:
            lease(run_uri, job, clock).acquire()
            winners.append(job)
        except RunLeaseHeld:
            refused.append(job)

    threads = [threading.Thread(target=start, args=(f"job:{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1 and len(refused) == 7
    body = json.loads(storage.read_bytes(storage.join(run_uri, LEASE)))
    assert body["holder"]["job"] == winners[0]


def test_a_job_that_lost_its_lease_commits_no_latest_json_and_deletes_nothing(run_uri: str) -> None:
    clock = Clock()
    old = lease(run_uri, "job:a", clock, ttl=60).acquire()
    writer = CheckpointWriter(run_uri, keep_last=1, fence=old.fence)
    writer.commit(Snapshot(1, 0, {"model": {"w": torch.zeros(2)}}, {"step": 1}))
    clock.now += 120
    new = lease(run_uri, "job:b", clock).acquire()
    new_writer = CheckpointWriter(run_uri, keep_last=1, fence=new.fence)
    new_writer.commit(Snapshot(5, 0, {"model": {"w": torch.ones(2)}}, {"step": 5}))
    with pytest.raises(LeaseLost):
        writer.commit(Snapshot(9, 0, {"model": {"w": torch.zeros(2)}}, {"step": 9}))
    latest = json.loads(storage.read_bytes(storage.join(checkpoints_uri(run_uri), LATEST)))
    assert latest["step"] == 5  # the new owner's, never the old job's
    assert 5 in [c.step for c in list_checkpoints(checkpoints_uri(run_uri)) if c.committed]
