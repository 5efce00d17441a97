"""One owner per run: a lease object ``<run>/lease.json`` that a job holds while it writes the run.

Two jobs started on the same run (a re-submitted Job, a copy-pasted values file) would otherwise interleave their
checkpoint commits and retention deletes. The lease is a compare-and-swap on one small object (S3 conditional
PUTs: ``If-None-Match: *`` to create, ``If-Match: <etag>`` to renew, release or take over; on local disk an
exclusive create and a lock file), so exactly one job can hold it:

- a job takes the lease before writing anything; a lease held by another live job refuses the run (exit 2, one
  line naming the run, the holder and the lease's age);
- the same job's restarted pods take their own lease back (the holder is the job's identity: see
  ``job_identity``);
- a lease not renewed for its TTL is stale, and so is one whose holder process on this host is gone: either may
  be taken over, with a warning; a released lease (a job that stopped cleanly) is free;
- a thread renews it every TTL/4; every ``latest.json`` commit, retention delete and weights file is fenced by a
  synchronous renew, so a job that lost its lease stops writing (``LeaseLost``) instead of overwriting the new
  owner's files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trainer import storage
from trainer.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "detection-trainer/lease-1"
LEASE = "lease.json"
DEFAULT_TTL_SECONDS = 120.0


class RunLeaseHeld(InputError):
    """Another live job holds this run: writing it too would destroy both jobs' work."""


class LeaseLost(InputError):
    """This job's lease was taken over (it was stale or released): it must stop writing the run."""


def job_identity() -> str:
    """Who holds the lease: the same for every pod and restart of one job, different for another job.

    ``TRAINER_JOB_ID`` if set, else torchrun's run id (the chart passes ``--rdzv-id=<release>``, the same for
    every pod and restart of one release; a plain ``torchrun`` has one per invocation), else a fresh id for this
    process (``python -m trainer.train``). Inside a pod the namespace (``POD_NAMESPACE``) is part of it.
    """
    namespace = os.environ.get("POD_NAMESPACE", "").strip()
    for name in ("TRAINER_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name, "").strip()
        if value and value.lower() != "none":
            kind = name.removeprefix("TRAINER_").removeprefix("TORCHELASTIC_").lower()
            return f"{kind}:{namespace + '/' if namespace else ''}{value[:128]}"
    return f"process:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Holder:
    job: str
    host: str
    pid: int

    @staticmethod
    def here(job: str | None = None) -> Holder:
        return Holder(job or job_identity(), socket.gethostname(), os.getpid())

    def describe(self) -> str:
        return f"{self.job} on {self.host} (pid {self.pid})"


@dataclass(frozen=True)
class LeaseRecord:
    holder: Holder
    acquired: float  # epoch seconds
    renewed: float
    ttl_seconds: float
    released: bool

    def age(self, now: float) -> float:
        return max(0.0, now - self.renewed)

    def stale(self, now: float) -> bool:
        return now - self.renewed > self.ttl_seconds

    def holder_gone(self) -> bool:
        """The holder ran on this host and its process no longer exists (a local kill -9, or a crash)."""
        if self.holder.host != socket.gethostname():
            return False
        try:
            os.kill(self.holder.pid, 0)  # PermissionError: alive, another user's process
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def to_bytes(self, run_uri: str) -> bytes:
        body = {"format": FORMAT, "run": run_uri, "holder": vars(self.holder), "ttl_seconds": self.ttl_seconds,
                "acquired": _iso(self.acquired), "renewed": _iso(self.renewed), "released": self.released}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @staticmethod
    def parse(uri: str, data: bytes) -> LeaseRecord | None:
        """The record, or None for a damaged lease (treated as stale: it cannot name a live holder)."""
        try:
            body = json.loads(data)
            holder = body["holder"]
            return LeaseRecord(Holder(str(holder["job"]), str(holder["host"]), int(holder["pid"])),
                               _epoch(body["acquired"]), _epoch(body["renewed"]), float(body["ttl_seconds"]),
                               bool(body.get("released", False)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s: damaged lease (%s: %s); treating it as stale", uri, type(exc).__name__, exc)
            return None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _epoch(text: Any) -> float:
    return datetime.fromisoformat(str(text)).timestamp()


class RunLease:
    """The lease of one run, held by this job from ``acquire`` to ``release``."""

    def __init__(self, run_uri: str, ttl_seconds: float = DEFAULT_TTL_SECONDS, holder: Holder | None = None,
                 clock: Any = time.time) -> None:
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, LEASE)
        self.ttl = float(ttl_seconds)
        self.holder = holder or Holder.here()
        self._clock = clock
        self._etag: str | None = None
        self._acquired = 0.0
        self._lock = threading.Lock()  # one conditional write at a time (the renew thread and fences)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why, once the lease was lost

    # ------------------------------------------------------------------------------------------ taking
    def acquire(self) -> RunLease:
        """Take the lease, or raise RunLeaseHeld naming the live holder. Bounded: a few compare-and-swap rounds."""
        for _ in range(5):
            now = self._clock()
            record = self._record(now, released=False, acquired=now)
            try:
                self._etag = storage.create_exclusive(self.uri, record.to_bytes(self.run_uri))
                self._acquired = now
                log.info("run lease taken: %s holds %s", self.holder.describe(), self.run_uri)
                return self
            except storage.PreconditionFailed:
                pass
            try:
                current = storage.read_versioned(self.uri)
            except storage.NotFound:
                continue  # released and deleted between the two calls: try the create again
            existing = LeaseRecord.parse(self.uri, current.data)
            takeover = self._takeover(existing, now)
            if takeover is None:
                assert existing is not None
                raise RunLeaseHeld(
                    f"{self.run_uri}: this run is being written by another job ({existing.holder.describe()}, "
                    f"lease renewed {existing.age(now):.0f} s ago, stale after {existing.ttl_seconds:.0f} s); "
                    "use another run.name, stop that job, or wait for its lease to go stale")
            try:
                self._etag = storage.replace_if_match(self.uri, record.to_bytes(self.run_uri), current.etag)
            except (storage.PreconditionFailed, storage.NotFound):
                continue  # someone else moved first: look again
            self._acquired = now
            reason, routine = takeover
            (log.info if routine else log.warning)(
                "run lease taken over (%s): %s now holds %s", reason, self.holder.describe(), self.run_uri)
            return self
        raise RunLeaseHeld(f"{self.uri}: the lease kept changing while this job tried to take it; another job is "
                           "starting on the same run")

    def _takeover(self, existing: LeaseRecord | None, now: float) -> tuple[str, bool] | None:
        """Why this job may take the lease and whether that is routine (our own job's lease, or one released on a
        clean stop, as before every resume after a preemption) rather than worth a warning (a damaged, stale or
        orphaned lease); None when another live job holds it."""
        if existing is None:
            return "the lease was damaged", False
        if existing.holder.job == self.holder.job:
            return f"our own lease, from {existing.holder.host} (pid {existing.holder.pid})", True
        if existing.released:
            return f"released by {existing.holder.describe()}", True
        if existing.stale(now):
            return (f"stale: {existing.holder.describe()} last renewed it {existing.age(now):.0f} s ago, "
                    f"TTL {existing.ttl_seconds:.0f} s"), False
        if existing.holder_gone():
            return f"its holder {existing.holder.describe()} no longer runs on this host", False
        return None

    def _record(self, now: float, *, released: bool, acquired: float | None = None) -> LeaseRecord:
        return LeaseRecord(self.holder, acquired if acquired is not None else self._acquired, now, self.ttl,
                           released)

    # ------------------------------------------------------------------------------------------ keeping
    def fence(self) -> None:
        """Renew now and make sure the lease is still ours: called right before a write that must not come from a
        job that lost the run (``latest.json``, retention, weights). Raises LeaseLost."""
        self._renew(raise_lost=True)

    def _renew(self, *, raise_lost: bool) -> None:
        with self._lock:
            if self.lost is None and self._etag is not None:
                data = self._record(self._clock(), released=False).to_bytes(self.run_uri)
                try:
                    self._etag = storage.replace_if_match(self.uri, data, self._etag)
                except (storage.PreconditionFailed, storage.NotFound):
                    self.lost = self._who_took_it()
                    log.error("%s", self.lost)
            if self.lost is not None and raise_lost:
                raise LeaseLost(self.lost)

    def _who_took_it(self) -> str:
        try:
            record = LeaseRecord.parse(self.uri, storage.read_versioned(self.uri).data)
        except storage.StorageError:
            record = None
        holder = record.holder.describe() if record is not None else "another job"
        return (f"{self.run_uri}: this job lost its run lease to {holder} (it was not renewed for "
                f"{self.ttl:.0f} s, or was released); stopping without writing anything more")

    def start_renewing(self) -> RunLease:
        """Renew every TTL/4 in a daemon thread; a failed renewal (S3 outage) is retried at the next tick."""
        def loop() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    self._renew(raise_lost=False)
                except storage.StorageError as exc:
                    log.warning("run lease: renewal failed (%s); retrying in %.0f s", exc, self.ttl / 4)
                if self.lost is not None:
                    return

        self._thread = threading.Thread(target=loop, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Mark the lease released (the run stopped cleanly), so another job may start at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self.lost is not None or self._etag is None:
                return
            try:
                storage.replace_if_match(self.uri, self._record(self._clock(), released=True).to_bytes(self.run_uri),
                                         self._etag)
            except storage.StorageError as exc:
                log.warning("run lease: could not release it (%s); it goes stale after %.0f s", exc, self.ttl)
            self._etag = None
