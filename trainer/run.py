"""A training run's long-lived parts, built once from the config: data, model, optimizer and schedule (the
``Trainables`` a checkpoint holds), their DDP wrapper, the checkpointing policy, the logs and the progress meter,
all positioned where the run stopped last time. ``loop.py`` tells the story over this object.

Rank 0 alone writes shared outputs under ``<run.dir>/<run.name>/`` (config.yaml, metrics.jsonl, plots/, the best
and final weights, the checkpoints), and only while it holds the run's lease.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from trainer import storage
from trainer.checkpoint.policy import Checkpointing, resume_point, start_resume_lookup
from trainer.checkpoint.state import EvalRecord, ResumePoint, Trainables
from trainer.checkpoint.store import LatestPrefetch
from trainer.config import Config
from trainer.data.cache import DiskCache
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection, ObjectSource
from trainer.data.loader import LoaderStats, build_loader
from trainer.data.sampler import ResumableDistributedBatchSampler, aspect_ratio_group_ids
from trainer.data.tiles import TileSpec
from trainer.data.transforms import build_transforms
from trainer.distributed import DistEnv, broadcast_object
from trainer.engine import ModelEma, TrainState
from trainer.exit_codes import EXIT_PREEMPTED
from trainer.inference import ValidationSet
from trainer.inference import build_validation as build_validation_set
from trainer.lease import RunLease, RunLeaseHeld
from trainer.optim import SampleSchedule, build_optimizer, lr_scale
from trainer.progress import ProgressMeter, SampleClock
from trainer.run_log import RunLog
from trainer.stop_signal import StopSignal
from trainer.tracking import Tracker, open_tracker
from trainer.watchdog import ProgressWatchdog

log = logging.getLogger("trainer.train")


@dataclass
class TrainData:
    dataset: CocoDetection
    sampler: ResumableDistributedBatchSampler
    loader: Any  # a DataLoader of (images, targets, metas) batches in the sampler's order


@dataclass
class Run:
    """Everything a run holds from start to end; ``record`` and ``pending_eval`` change as it goes."""

    config: Config
    env: DistEnv
    stop: StopSignal
    lease: RunLease | None
    data: TrainData
    validation: ValidationSet | None  # built once, evaluated after every eval.every_epochs epochs
    trainables: Trainables
    ddp: torch.nn.Module  # the model as trained (DDP-wrapped when distributed)
    autocast_dtype: torch.dtype | None
    clock: SampleClock
    meter: ProgressMeter
    checkpointing: Checkpointing
    watchdog: ProgressWatchdog
    run_log: RunLog
    tracker: Tracker  # MLflow on rank 0 when log.mlflow is set; a no-op otherwise
    loader_stats: LoaderStats
    trace: SampleTrace | None
    start_epoch: int
    record: EvalRecord  # best metric and evaluations without improvement: checkpointed, so early stopping resumes
    pending_eval: bool  # resumed from a stop during the start epoch's evaluation: only that is left of it

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are evaluated and saved as model_best/model_final: the EMA when kept."""
        ema = self.trainables.ema
        return ema.module if ema is not None else self.trainables.model

    def training_done_for(self, epoch: int) -> bool:
        """True once, for the resumed epoch whose training ended before a stop interrupted its evaluation."""
        pending, self.pending_eval = self.pending_eval, False
        return pending and epoch == self.start_epoch

    def evaluates_after(self, epoch: int) -> bool:
        every, last = self.config.eval.every_epochs, epoch + 1 == self.config.schedule.epochs
        return self.validation is not None and bool(every) and ((epoch + 1) % every == 0 or last)

    @property
    def best(self) -> float | None:
        return self.record.best

    def stops_early(self) -> bool:
        """``eval.patience`` evaluations in a row without improvement: the run ends after this epoch."""
        patience = self.config.eval.patience
        if not self.record.exhausted(patience):
            return False
        if self.env.is_main:
            log.warning("early stopping: %s has not risen by more than eval.min_delta=%g in %d evaluation(s) "
                        "(eval.patience=%d; best %.4f); ending the run after this epoch", self.config.eval.metric,
                        self.config.eval.min_delta, self.record.stale_evals, patience, self.record.best or 0.0)
        return True

    def fence(self) -> None:
        """Before rank 0 writes a shared file: still the run's owner (raises LeaseLost otherwise)."""
        if self.lease is not None:
            self.lease.fence()


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


def start_run(config: Config, env: DistEnv, stop: StopSignal, lease: RunLease | None,
              prefetch: LatestPrefetch | None, force: bool) -> Run | None:
    """Build the run's parts and put them where the run last stopped; None when a stop arrived meanwhile (nothing
    new to save: the latest checkpoint, if any, is where the run is)."""
    seed_everything(config.train.seed, env.rank)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    lookup = start_resume_lookup(config, prefetch)
    data = build_train_data(config, env)
    validation = build_validation(config, env)  # a broken val file is refused now (exit 2), not after an epoch
    if stopped_during_startup(stop, "reading the data index"):
        return None
    trainables, clock, autocast_dtype = build_trainables(config, env, data)
    if stopped_during_startup(stop, "building the model"):
        return None
    resumed = resume_point(lookup, config, env, trainables, force)
    if stopped_during_startup(stop, "resuming"):
        return None
    if env.is_main:  # only now: a refused resume must not overwrite the run's record of its config
        if lease is not None:
            lease.fence()
        storage.write_text(storage.join(config.run_uri, "config.yaml"), config.to_yaml())
        log.info("run outputs under %s", config.run_uri)
    return assemble(config, env, stop, lease, data, validation, trainables, clock, autocast_dtype, resumed)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def stopped_during_startup(stop: StopSignal, what: str) -> bool:
    """A stop before the first step: nothing new to save (the latest checkpoint, if any, is where we are)."""
    if stop.requested:
        log.warning("stopped by %s during start-up (%s): nothing new to save; exiting with code %d (preempted)",
                    stop.received, what, EXIT_PREEMPTED)
    return stop.requested


def build_train_data(config: Config, env: DistEnv) -> TrainData:
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
    return TrainData(dataset, sampler, build_loader(dataset, sampler, workers=config.data.workers))


def build_validation(config: Config, env: DistEnv) -> ValidationSet | None:
    """The validation split, prepared once for every evaluation of the run (None without ``data.val.coco`` or
    with ``eval.every_epochs: 0``)."""
    if not config.data.val.coco or not config.eval.every_epochs:
        return None
    validation = build_validation_set(config.data.val, config, env)
    if env.is_main:
        log.info("validation: %d images from %s, prepared once for every evaluation", len(validation.index.images),
                 config.data.val.coco)
    return validation


def build_trainables(config: Config, env: DistEnv, data: TrainData,
                     ) -> tuple[Trainables, SampleClock, torch.dtype | None]:
    """The model, optimizer, sample-based schedule, EMA and AMP scaler; the sample clock the schedule follows;
    the autocast dtype (None without AMP on CUDA)."""
    from trainer.models import build_model

    model: torch.nn.Module = build_model(config.model, data.dataset.index.num_classes).to(env.device)
    if config.train.sync_bn and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    samples_per_step = data.sampler.global_batch_size * config.train.accumulate
    clock = SampleClock(data.sampler.num_samples, config.schedule.epochs, samples_per_step)
    optimizer = build_optimizer(model, config.optim, lr_scale(config.optim, samples_per_step))
    scheduler = SampleSchedule(optimizer, config.schedule, data.sampler.num_samples, samples_per_step,
                               clock=lambda: clock.samples)
    autocast_dtype = None
    if env.device.type == "cuda" and config.train.amp:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema else None
    trainables = Trainables(model, optimizer, scheduler, TrainState(), data.sampler, ema, scaler)
    return trainables, clock, autocast_dtype


def start_tracking(config: Config, env: DistEnv, resumed: ResumePoint | None) -> Tracker:
    """Rank 0's MLflow tracker (a no-op elsewhere or when off). A run resumed from its own latest checkpoint goes
    on logging to the MLflow run that checkpoint names; steps it redoes are not logged twice (the tracker skips
    steps the MLflow run already has)."""
    tracker = open_tracker(config.log.mlflow, config.run_uri, config.run.name, env.rank)
    own = resumed is not None and config.checkpoint.resume == "auto"  # another run's checkpoint: a new MLflow run
    tracker.start(resumed.tracking.get("mlflow_run_id") if own and resumed else None, config.to_dict())
    tracker.set_tags({"trainer.world_size": env.world_size})
    return tracker


def assemble(config: Config, env: DistEnv, stop: StopSignal, lease: RunLease | None, data: TrainData,
             validation: ValidationSet | None, trainables: Trainables, clock: SampleClock,
             autocast_dtype: torch.dtype | None, resumed: ResumePoint | None) -> Run:
    """The run at its starting point (a resumed one where its checkpoint left it)."""
    start_epoch, record = (resumed.epoch, resumed.record) if resumed else (0, EvalRecord())
    pending_eval = resumed.pending_eval if resumed else False
    if start_epoch >= config.schedule.epochs:
        log.info("the checkpoint is from the end of training (%d epochs): nothing left to train",
                 config.schedule.epochs)
    elif record.exhausted(config.eval.patience) and not pending_eval:
        log.info("the checkpoint is from a run that stopped early (%d evaluations without improvement, "
                 "eval.patience=%d): nothing left to train", record.stale_evals, config.eval.patience)
        start_epoch = config.schedule.epochs
    model = trainables.model
    ddp = model
    if env.distributed:
        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    tracker = start_tracking(config, env, resumed)
    run_log = RunLog(config.run_uri, active=env.is_main, tensorboard=config.log.tensorboard, tracker=tracker)
    if resumed:
        run_log.forget_after(resumed.step)  # steps after the checkpoint are about to be redone
    watchdog = ProgressWatchdog(config.train.hang_timeout_seconds, env.rank, lambda: stop.received is not None)
    checkpointing = Checkpointing(config, env, trainables, record, stop, data.dataset.index, lease, watchdog,
                                  tracking=lambda: {"mlflow_run_id": tracker.run_id} if tracker.run_id else {})
    trace = SampleTrace(config.log.sample_trace, env) if config.log.sample_trace else None
    position = data.sampler.state_dict()["position"] if resumed and not pending_eval else 0
    clock.set(start_epoch + pending_eval, position)
    return Run(config, env, stop, lease, data, validation, trainables, ddp, autocast_dtype, clock,
               ProgressMeter(clock.done), checkpointing, watchdog, run_log, tracker, LoaderStats(), trace, start_epoch,
               record, pending_eval)
