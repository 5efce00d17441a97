"""When a run saves and where it resumes from: the policy over the commit mechanism (``commit``/``store``) and
the training state (``state``).

A run saves every ``checkpoint.every_steps`` steps, every ``checkpoint.every_minutes`` minutes, at the end of an
epoch when asked (after its evaluation, so the checkpoint knows the epoch's metric), at the end of training, and
when a stop signal arrives. Decisions that depend on one rank (its clock, a signal it received, rank 0's lease)
are agreed with one small all-reduce per step, so every rank snapshots at the same step and no rank runs ahead of
the saved state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainer.checkpoint.commit import CheckpointWriter
from trainer.checkpoint.layout import CheckpointError, checkpoints_uri
from trainer.checkpoint.state import (
    EvalRecord,
    ResumePoint,
    Trainables,
    check_config,
    check_resumable,
    restore,
    take_snapshot,
)
from trainer.checkpoint.store import LatestPrefetch, LoadedCheckpoint, find_resumable, load_checkpoint, resolve
from trainer.config import Config
from trainer.data.coco_index import CocoIndex
from trainer.distributed import DistEnv, any_rank, broadcast_object
from trainer.errors import InputError
from trainer.lease import LeaseLost, RunLease
from trainer.stop_signal import StopSignal
from trainer.watchdog import ProgressWatchdog

log = logging.getLogger("trainer.train")


class Checkpointing:
    """Decides, step by step and epoch by epoch, whether to save, and saves (rank 0 uploads in the background).

    ``after_step`` and ``after_epoch`` return False when every rank agreed to stop: the stop checkpoint is then
    committed and the caller ends the run as preempted.
    """

    def __init__(self, config: Config, env: DistEnv, trainables: Trainables, record: EvalRecord, stop: StopSignal,
                 index: CocoIndex, lease: RunLease | None, watchdog: ProgressWatchdog,
                 tracking: Callable[[], dict[str, str]] = dict) -> None:
        self.config, self.env, self.t, self.stop, self.lease = config, env, trainables, stop, lease
        self.tracking = tracking  # the experiment-tracking ids to keep in each checkpoint (rank 0 knows them)
        self.record, self.watchdog = record, watchdog  # the run's evaluation history: saved with every checkpoint
        self.classes: dict[str, list[Any]] = {"category_ids": list(index.category_ids),
                                              "category_names": list(index.category_names)}
        self.writer = CheckpointWriter(config.run_uri, config.checkpoint.keep_last,
                                       fence=lease.fence if lease else None) if env.is_main else None
        self.last_save = time.monotonic()
        self.stall_seconds = 0.0
        self.warned_grace = False
        self.due_at_epoch_end = False  # a save fell due at the epoch's last step: it happens after the evaluation

    def agreed_flags(self) -> tuple[bool, bool]:
        """(time for a timed checkpoint, stop requested) as every rank sees them; a lost lease stops every rank."""
        minutes = self.config.checkpoint.every_minutes
        timed = bool(minutes) and self.env.is_main and time.monotonic() - self.last_save >= minutes * 60
        lost = self.lease is not None and self.lease.lost is not None
        timed, stop, lost = any_rank(self.env, timed, self.stop.requested, lost)
        if lost:
            raise LeaseLost((self.lease.lost if self.lease is not None else None)
                            or f"{self.config.run_uri}: rank 0 lost the run lease; stopping without writing more")
        return timed, stop

    def stop_agreed(self) -> bool:
        return self.agreed_flags()[1]

    def after_step(self, epoch: int, consumed_batches: int, epoch_end: bool) -> bool:
        """Save if due after this optimizer step (at an epoch's end: after its evaluation, unless stopping)."""
        timed, stop = self.agreed_flags()
        every = self.config.checkpoint.every_steps
        save = (bool(every) and self.t.state.step % every == 0) or timed or stop
        self.due_at_epoch_end = save and epoch_end
        if stop and epoch_end:
            self.save_before_evaluation(epoch)
        elif save and not epoch_end:
            self.save(epoch=epoch, epoch_done=False, consumed_batches=consumed_batches, metric=None, wait=stop)
        return not stop

    def after_epoch(self, epoch: int, metric: float | None, last: bool) -> bool:
        """The end-of-epoch save (every epoch if asked, when one fell due at its last step, at the end of training,
        on a stop); False when a stop was agreed before the last epoch."""
        stop = self.stop_agreed()
        if self.config.checkpoint.every_epoch or self.due_at_epoch_end or last or stop:
            self.save(epoch=epoch, epoch_done=True, consumed_batches=0, metric=metric, wait=last or stop)
        self.due_at_epoch_end = False
        return last or not stop

    def save_before_evaluation(self, epoch: int) -> None:
        """A stop after an epoch's training but before its evaluation finished: the resume evaluates it first."""
        self.save(epoch=epoch, epoch_done=True, consumed_batches=0, metric=None, wait=True, eval_pending=True)

    def save(self, *, epoch: int, epoch_done: bool, consumed_batches: int, metric: float | None,
             wait: bool = False, eval_pending: bool = False) -> None:
        """Snapshot now (every rank), upload in the background (rank 0); ``wait`` for the commit."""
        self.watchdog.pause()
        started = time.perf_counter()
        snapshot = take_snapshot(self.t, self.env, self.config, epoch=epoch, epoch_done=epoch_done,
                                 consumed_batches=consumed_batches, record=self.record, metric=metric,
                                 classes=self.classes, eval_pending=eval_pending,
                                 tracking=self.tracking() if self.env.is_main else None)
        if self.writer is not None and snapshot is not None:
            self.writer.submit(snapshot)
            if wait:
                self.writer.wait()
        self.last_save = time.monotonic()
        stalled = time.perf_counter() - started
        self.stall_seconds += stalled
        if self.env.is_main:
            log.info("checkpoint step %d: %s", self.t.state.step,
                     f"saved in {stalled:.2f} s" if wait else
                     f"training paused {stalled:.2f} s for the snapshot; uploading in the background")
        self.watchdog.beat()

    def check_grace(self, seconds: float, what: str) -> None:
        """Warn once when finishing ``what`` (a step, an evaluation batch) plus a blocking save would not fit the
        grace period: a stop is honoured only between two of them."""
        committed = self.writer.last_committed if self.writer is not None else None
        if committed is None or self.warned_grace:
            return
        needed = seconds + committed.seconds
        if needed > 0.8 * self.config.checkpoint.grace_seconds:
            self.warned_grace = True
            log.warning("a stop checkpoint needs about %.0f s (%s %.1f s + save %.1f s), close to or over "
                        "checkpoint.grace_seconds=%g: raise the pod's terminationGracePeriodSeconds (and this key)",
                        needed, what, seconds, committed.seconds, self.config.checkpoint.grace_seconds)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def start_resume_lookup(config: Config, prefetch: LatestPrefetch | None,
                        ) -> Future[LoadedCheckpoint | None] | None:
    """Find, download and verify the checkpoint to resume from in the background, while the data index and the
    model are built (every rank does it: a restarted job's start-up is dominated by this download). The bytes of
    ``latest.json``'s checkpoint usually arrive already verified from ``prefetch`` (started before torch's import)."""
    setting = config.checkpoint.resume
    if setting == "never":
        return None

    def lookup() -> LoadedCheckpoint | None:
        if setting != "auto":
            return resolve(setting, check=check_resumable)
        ahead = prefetch.take() if prefetch is not None else None
        return find_resumable(checkpoints_uri(config.run_uri), check=check_resumable, prefetched=ahead)

    pool = ThreadPoolExecutor(1, thread_name_prefix="resume-lookup")
    future = pool.submit(lookup)
    pool.shutdown(wait=False)
    return future


def resume_point(lookup: Future[LoadedCheckpoint | None] | None, config: Config, env: DistEnv,
                 trainables: Trainables, force: bool) -> ResumePoint | None:
    """Where this run continues: the checkpoint rank 0 found; other ranks use their own copy when it is the same
    one (the usual case) and load rank 0's choice otherwise."""
    if lookup is None:
        return None
    try:
        found = lookup.result()
    except InputError:
        if env.is_main:
            raise
        found = None  # rank 0 reports it; this rank follows rank 0's choice below
    chosen = broadcast_object(env, found.uri if found is not None else None)
    if chosen is None:
        log.info("no checkpoint under %s: starting from scratch", checkpoints_uri(config.run_uri))
        return None
    checkpoint = found if found is not None and found.uri == chosen else load_checkpoint(chosen)
    check_config(checkpoint, config, force)
    try:
        return restore(trainables, checkpoint, env)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # e.g. --force over a model change
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{checkpoint.uri}: cannot restore this run from it ({first})") from exc
