"""The training run behind ``trainer.train``: wires the pieces together (lease → data → model → optimizer →
resume → epochs of steps, evaluation and checkpoints); each piece lives in its own module.

Rank 0 alone writes shared outputs under ``<run.dir>/<run.name>/``: config.yaml, metrics.jsonl, plots/, the
best and final weights and the checkpoints (the commit protocol of DESIGN.md).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from trainer import storage
from trainer.config import Config
from trainer.data.cache import DiskCache
from trainer.data.coco_index import CocoIndex, load_coco_index
from trainer.data.dataset import CocoDetection, ObjectSource
from trainer.data.loader import LoaderStats, build_loader
from trainer.data.sampler import ResumableDistributedBatchSampler, aspect_ratio_group_ids
from trainer.data.tiles import TileSpec
from trainer.data.transforms import build_transforms
from trainer.checkpoint import (CheckpointError, CheckpointWriter, LatestPrefetch, LoadedCheckpoint,
                                checkpoints_uri, find_resumable, load_checkpoint, resolve)
from trainer.lease import LeaseLost, RunLease, RunLeaseHeld
from trainer.distributed import DistEnv, broadcast_object, shutdown
from trainer.engine import ModelEma, TrainState, train_step
from trainer.errors import InputError
from trainer.exit_codes import EXIT_OK, EXIT_PREEMPTED
from trainer.inference import EvaluationStopped, evaluate_split, save_weights
from trainer.optim import SampleSchedule, build_optimizer, lr_scale
from trainer.progress import ProgressLine, format_eval, format_progress
from trainer.resume import ResumePoint, Trainables, check_config, check_resumable, restore, take_snapshot
from trainer.run_log import RunLog
from trainer.stop_signal import StopSignal
from trainer.watchdog import ProgressWatchdog

log = logging.getLogger("trainer.train")


class SampleTrace:
    """``log.sample_trace``: each rank appends ``restart epoch step image_id`` per training sample to a local
    file, to check which images a run saw (e.g. that a resumed epoch repeats and skips none)."""

    def __init__(self, folder: str, env: DistEnv) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"rank{env.rank}-restart{env.restart_count}-pid{os.getpid()}.txt")
        self.restart = env.restart_count

    def write(self, epoch: int, step: int, targets: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(f"{self.restart} {epoch} {step} {int(t['image_id'])}\n" for t in targets)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def build_train_data(config: Config, env: DistEnv) -> tuple[CocoDetection, ResumableDistributedBatchSampler]:
    index = load_coco_index(config.data.train.coco)
    tiles = config.data.tiles
    dataset = CocoDetection(
        index, config.data.train.images,
        build_transforms(config.data.augment, train=True, mean=config.data.mean, std=config.data.std),
        seed=config.train.seed, strict=config.data.strict, max_pixels=config.data.max_pixels,
        tiles=TileSpec(tiles.size, tiles.overlap, tiles.min_visibility) if tiles.enabled else None,
        source=ObjectSource(DiskCache(config.data.cache_dir, int(config.data.cache_gb * 1e9)))
        if config.data.cache_dir else None)
    groups = None
    if config.data.aspect_ratio_groups > 0 and not tiles.enabled:
        groups = aspect_ratio_group_ids([r.width for r in dataset.records], [r.height for r in dataset.records],
                                        k=config.data.aspect_ratio_groups)
    sampler = ResumableDistributedBatchSampler(len(dataset), config.data.batch_size, env.world_size, env.rank,
                                               seed=config.train.seed, group_ids=groups)
    return dataset, sampler


class Checkpointing:
    """When to save (every N steps, every M minutes, end of epoch, end of run, on a stop signal) and the saving.

    Decisions that depend on one rank (its clock, a signal it received, rank 0's lease) are agreed with one
    small all-reduce per step, so every rank snapshots at the same step and no rank runs ahead of the saved state.
    """

    def __init__(self, config: Config, env: DistEnv, trainables: Trainables, stop: StopSignal,
                 index: CocoIndex, lease: RunLease | None) -> None:
        self.config, self.env, self.t, self.stop, self.lease = config, env, trainables, stop, lease
        self.classes = {"category_ids": list(index.category_ids), "category_names": list(index.category_names)}
        self.writer = CheckpointWriter(config.run_uri, config.checkpoint.keep_last,
                                       fence=lease.fence if lease else None) if env.is_main else None
        self.last_save = time.monotonic()
        self.stall_seconds = 0.0
        self.warned_grace = False

    def agreed_flags(self) -> tuple[bool, bool]:
        """(time for a timed checkpoint, stop requested) as every rank sees them; a lost lease stops every rank."""
        minutes = self.config.checkpoint.every_minutes
        timed = bool(minutes) and self.env.is_main and time.monotonic() - self.last_save >= minutes * 60
        lost = self.lease is not None and self.lease.lost is not None
        timed, stop, lost = agree(self.env, timed, self.stop.requested, lost)
        if lost:
            raise LeaseLost((self.lease.lost if self.lease is not None else None)
                            or f"{self.config.run_uri}: rank 0 lost the run lease; stopping without writing more")
        return timed, stop

    def due(self, step: int) -> tuple[bool, bool]:
        timed, stop = self.agreed_flags()
        every = self.config.checkpoint.every_steps
        return (bool(every) and step % every == 0) or timed or stop, stop

    def save(self, *, epoch: int, epoch_done: bool, consumed_batches: int, best: float | None,
             metric: float | None, wait: bool = False, eval_pending: bool = False) -> None:
        started = time.perf_counter()
        snapshot = take_snapshot(self.t, self.env, self.config, epoch=epoch, epoch_done=epoch_done,
                                 consumed_batches=consumed_batches, best=best, metric=metric,
                                 classes=self.classes, eval_pending=eval_pending)
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


def agree(env: DistEnv, *flags: bool) -> list[bool]:
    """Each flag OR-ed over every rank (one tiny all-reduce, on the rank's device for NCCL)."""
    values = torch.tensor([float(flag) for flag in flags], device=env.device)
    if env.distributed:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def take_run_lease(config: Config, env: DistEnv) -> RunLease | None:
    """Rank 0 takes the run's lease before anything is written; every rank learns whether it may go on (and
    fails the same way when it may not: held by another job, exit 2; storage unreachable, exit 1). Ranks other
    than 0 get None: they write nothing shared."""
    lease, failure = None, None
    if env.is_main:
        try:
            lease = RunLease(config.run_uri, config.checkpoint.lease_ttl_seconds).acquire().start_renewing()
        except RunLeaseHeld as exc:
            failure = ("held", str(exc), "")
        except storage.StorageError as exc:
            failure = ("storage", exc.uri, exc.cause)
    failure = broadcast_object(env, failure)
    if failure is not None:
        kind, first, second = failure
        raise RunLeaseHeld(first) if kind == "held" else storage.StorageError(first, second)
    return lease


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


class SampleClock:
    """The run's samples consumed (epochs done x data set size + the position in this epoch): what the LR
    schedule, the progress line and the ETA follow, so they do not bend when the world size changes."""

    def __init__(self, epoch_samples: int, epochs: int, samples_per_step: int) -> None:
        self.epoch_samples, self.total = epoch_samples, epoch_samples * epochs
        self.samples_per_step = samples_per_step  # global batch x accumulate: one optimizer step
        self.position = 0  # samples into the current epoch
        self.samples = 0

    def set(self, epoch: int, position: int) -> None:
        self.position = position
        self.samples = epoch * self.epoch_samples + position

    @property
    def done(self) -> float:
        return self.samples / max(1, self.total)

    def step_in_epoch(self) -> tuple[int, int]:
        """(optimizer steps into this epoch, steps per epoch) at this world size, from the data position."""
        return (math.ceil(self.position / self.samples_per_step),
                math.ceil(self.epoch_samples / self.samples_per_step))


def stopped_during_startup(stop: StopSignal, what: str) -> bool:
    """A stop before the first step: nothing new to save (the latest checkpoint, if any, is where we are)."""
    if stop.requested:
        log.warning("stopped by %s during start-up (%s): nothing new to save; exiting with code %d (preempted)",
                    stop.received, what, EXIT_PREEMPTED)
    return stop.requested


def train(config: Config, env: DistEnv, force: bool = False, stop: StopSignal | None = None,
          prefetch: LatestPrefetch | None = None) -> int:
    """Take the run's lease, train, and give the lease back however the run ends (a lost one is not touched)."""
    stop = stop or StopSignal().install()
    lease = take_run_lease(config, env)
    try:
        return _train(config, env, force, stop, lease, prefetch)
    finally:
        if lease is not None:
            lease.release()
        stop.uninstall()


def _train(config: Config, env: DistEnv, force: bool, stop: StopSignal, lease: RunLease | None,
           prefetch: LatestPrefetch | None) -> int:
    from trainer.models import build_model

    seed_everything(config.train.seed, env.rank)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_uri = config.run_uri
    lookup = start_resume_lookup(config, prefetch)
    dataset, sampler = build_train_data(config, env)
    if config.data.val.coco:  # a broken val file is refused now (exit 2), not after the first epoch
        load_coco_index(config.data.val.coco)
    if stopped_during_startup(stop, "reading the data index"):
        return EXIT_PREEMPTED
    loader = build_loader(dataset, sampler, workers=config.data.workers)
    model: torch.nn.Module = build_model(config.model, dataset.index.num_classes).to(env.device)
    if config.train.sync_bn and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    samples_per_step = sampler.global_batch_size * config.train.accumulate
    clock = SampleClock(sampler.num_samples, config.schedule.epochs, samples_per_step)
    optimizer = build_optimizer(model, config.optim, lr_scale(config.optim, samples_per_step))
    scheduler = SampleSchedule(optimizer, config.schedule, sampler.num_samples, samples_per_step,
                               clock=lambda: clock.samples)
    cuda = env.device.type == "cuda"
    autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if (cuda and config.train.amp) else None
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema else None
    state = TrainState()
    trainables = Trainables(model, optimizer, scheduler, state, sampler, ema, scaler)
    if stopped_during_startup(stop, "building the model"):
        return EXIT_PREEMPTED
    resumed = resume_point(lookup, config, env, trainables, force)
    if stopped_during_startup(stop, "resuming"):
        return EXIT_PREEMPTED
    if env.is_main:  # only now: a refused resume must not overwrite the run's record of its config
        if lease is not None:
            lease.fence()
        storage.write_text(storage.join(run_uri, "config.yaml"), config.to_yaml())
        log.info("run outputs under %s", run_uri)
    start_epoch, best = (resumed.epoch, resumed.best) if resumed else (0, None)
    pending_eval = resumed.pending_eval if resumed else False
    if start_epoch >= config.schedule.epochs:
        log.info("the checkpoint is from the end of training (%d epochs): nothing left to train",
                 config.schedule.epochs)
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None) if env.distributed else model
    run_log = RunLog(run_uri, active=env.is_main, tensorboard=config.log.tensorboard)
    if resumed:
        run_log.forget_after(resumed.step)  # steps after the checkpoint are about to be redone
    checkpointing = Checkpointing(config, env, trainables, stop, dataset.index, lease)
    watchdog = ProgressWatchdog(config.train.hang_timeout_seconds, env.rank)
    trace = SampleTrace(config.log.sample_trace, env) if config.log.sample_trace else None
    stats = LoaderStats()
    clock.set(start_epoch + pending_eval, sampler.state_dict()["position"] if resumed and not pending_eval else 0)
    done_at_start = clock.done
    started = time.perf_counter()
    for epoch in range(start_epoch, config.schedule.epochs):
        sampler.set_epoch(epoch)  # keeps a restored position in the resumed epoch
        ddp.train()
        window_start, wait, images_seen = time.perf_counter(), 0.0, 0
        fetch_start = time.perf_counter()
        batches_this_pass = 0
        save_at_epoch_end = False
        batches = [] if pending_eval else loader  # resumed from a stop during this epoch's evaluation
        pending_eval = False
        watchdog.beat()
        for batch_index, (images, targets, metas) in enumerate(batches):
            wait += time.perf_counter() - fetch_start
            stats.update(metas)
            if trace is not None:
                trace.write(epoch, state.step, targets)
            clock.set(epoch, sampler.position_after(batch_index + 1))  # what the schedule steps to
            outcome = train_step(ddp, optimizer, scheduler, images, targets, env.device, state,
                                 accumulate=config.train.accumulate, clip_grad_norm=config.train.clip_grad_norm,
                                 scaler=scaler, autocast_dtype=autocast_dtype, ema=ema,
                                 max_nonfinite_in_a_row=config.train.max_nonfinite_steps)
            watchdog.beat()
            batches_this_pass = batch_index + 1
            images_seen += len(images) * env.world_size
            if not outcome.optimizer_stepped:
                fetch_start = time.perf_counter()
                continue
            if state.step % config.log.every_steps == 0 or batch_index + 1 == len(loader):
                elapsed = time.perf_counter() - window_start
                rate = images_seen / max(elapsed, 1e-9)
                progress_done = (clock.done - done_at_start) / max(1e-12, 1 - done_at_start)
                step_in_epoch, steps = clock.step_in_epoch()
                line = ProgressLine(
                    epoch + 1, config.schedule.epochs, step_in_epoch, steps,
                    outcome.loss, outcome.terms, optimizer.param_groups[0]["lr"], rate,
                    wait / max(elapsed, 1e-9),
                    (time.perf_counter() - started) * (1 - progress_done) / max(progress_done, 1e-9),
                    torch.cuda.max_memory_allocated(env.device) / 1e9 if cuda else None)
                if env.is_main:
                    log.info("%s", format_progress(line))
                run_log.train({"epoch": epoch + 1, "step": state.step, "samples": clock.samples,
                               "progress": clock.done, "loss": outcome.loss, **outcome.terms,
                               "lr": line.lr, "images_per_s": rate, "data_wait": line.data_wait,
                               **stats.snapshot().as_dict()})
                window_start, wait, images_seen = time.perf_counter(), 0.0, 0
                checkpointing.check_grace(len(images) * env.world_size / max(rate, 1e-9), "one step")
            save_now, stop_now = checkpointing.due(state.step)
            save_at_epoch_end = save_now and batch_index + 1 == len(loader)
            if save_now and not save_at_epoch_end:  # at the end of an epoch, save after its evaluation
                watchdog.pause()
                checkpointing.save(epoch=epoch, epoch_done=False, consumed_batches=batches_this_pass, best=best,
                                   metric=None, wait=stop_now)
                watchdog.beat()
            if stop_now:
                if batch_index + 1 == len(loader):
                    checkpointing.save(epoch=epoch, epoch_done=True, consumed_batches=0, best=best, metric=None,
                                       wait=True, eval_pending=True)
                return preempted(env, ddp, model, optimizer, checkpointing, run_log, stop)
            fetch_start = time.perf_counter()
        clock.set(epoch + 1, 0)
        last = epoch + 1 == config.schedule.epochs
        metric: float | None = None  # this epoch's evaluation, if any: it marks the best checkpoint
        if config.data.val.coco and config.eval.every_epochs and ((epoch + 1) % config.eval.every_epochs == 0
                                                                  or last):
            evaluated = ema.module if ema else model
            try:
                metric, best = evaluate_epoch(evaluated, epoch, best, config, env, autocast_dtype, checkpointing,
                                              watchdog, run_log, state.step, dataset.index, lease)
            except EvaluationStopped:
                checkpointing.save(epoch=epoch, epoch_done=True, consumed_batches=0, best=best, metric=None,
                                   wait=True, eval_pending=True)
                return preempted(env, ddp, model, optimizer, checkpointing, run_log, stop)
        _, stop_now = checkpointing.agreed_flags()
        watchdog.pause()
        if config.checkpoint.every_epoch or save_at_epoch_end or last or stop_now:
            checkpointing.save(epoch=epoch, epoch_done=True, consumed_batches=0, best=best, metric=metric,
                               wait=last or stop_now)
        if stop_now and not last:
            return preempted(env, ddp, model, optimizer, checkpointing, run_log, stop)
    watchdog.pause()
    if env.is_main:
        final_uri = storage.join(run_uri, "model_final.pt")
        if lease is not None:
            lease.fence()
        save_weights(final_uri, (ema.module if ema else model).state_dict(), config.model, dataset.index)
        run_log.close()
        log.info("finished %d steps in %.1f s (checkpoint stalls %.1f s); final weights: %s", state.step,
                 time.perf_counter() - started, checkpointing.stall_seconds, final_uri)
    checkpointing.close()
    shutdown(env, ddp, model, optimizer)
    return EXIT_OK


def evaluate_epoch(model: torch.nn.Module, epoch: int, best: float | None, config: Config, env: DistEnv,
                   autocast_dtype: torch.dtype | None, checkpointing: Checkpointing, watchdog: ProgressWatchdog,
                   run_log: RunLog, step: int, index: CocoIndex, lease: RunLease | None,
                   ) -> tuple[float | None, float | None]:
    """This epoch's evaluation: (its metric, the best so far), logged, with ``model_best.pt`` when it improved.

    A stop request is agreed after every batch (so a long evaluation never outlasts the grace period); the
    watchdog is re-armed per batch and paused while rank 0 runs COCOeval.
    """
    if env.is_main:
        log.info("evaluating epoch %d on %s", epoch + 1, config.data.val.coco)
    batch_started = time.perf_counter()

    def after_batch() -> bool:
        nonlocal batch_started
        watchdog.beat()
        checkpointing.check_grace(time.perf_counter() - batch_started, "one evaluation batch")
        batch_started = time.perf_counter()
        _, stop_now = checkpointing.agreed_flags()
        if not stop_now:
            return False
        if env.is_main:
            log.warning("stop requested during the evaluation of epoch %d: it will run again after the resume",
                        epoch + 1)
        return True

    result = evaluate_split(model, config.data.val, config, env, autocast_dtype, should_stop=after_batch,
                            before_gather=watchdog.pause)
    metric: float | None = None
    if result is not None:
        metric = result.stats[config.eval.metric]
        improved = best is None or metric > best
        best = metric if improved else best
        note = f"best {config.eval.metric} so far" if improved else f"best {config.eval.metric} {best:.4f}"
        log.info("%s", format_eval(epoch + 1, result.stats, note, result.per_class))
        run_log.eval({"epoch": epoch + 1, "step": step, **result.stats, "per_class_ap": result.per_class,
                      "best": best})
        if improved:
            if lease is not None:
                lease.fence()
            save_weights(storage.join(config.run_uri, "model_best.pt"), model.state_dict(), config.model, index)
    return broadcast_object(env, (metric, best))


def preempted(env: DistEnv, ddp: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              checkpointing: Checkpointing, run_log: RunLog, stop: StopSignal) -> int:
    """After the stop checkpoint: flush the logs, leave the group, and say so with EXIT_PREEMPTED."""
    checkpointing.close()
    run_log.close()
    if env.is_main:
        since = time.monotonic() - stop.at if stop.at is not None else 0.0
        log.warning("stopped by %s: checkpoint committed %.1f s after the signal; exiting with code %d "
                    "(preempted) so the job restarts and resumes", stop.received or "a peer's signal", since,
                    EXIT_PREEMPTED)
    shutdown(env, ddp, model, optimizer)
    return EXIT_PREEMPTED
