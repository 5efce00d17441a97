"""The training story behind ``trainer.train``: take the run's lease, start the run (built, and resumed where it
stopped), then for each epoch train, evaluate and checkpoint; finish, or stop as preempted when a stop was agreed.

The parts live elsewhere and decide their own timing: ``run.py`` builds the run, ``checkpoint/policy.py`` decides
when to save, ``progress.py`` measures rate, data wait and ETA, ``engine.py`` does one optimizer step.
"""

from __future__ import annotations

import logging
import time

import torch

from trainer import storage
from trainer.checkpoint.store import LatestPrefetch
from trainer.config import Config
from trainer.distributed import DistEnv, broadcast_object, shutdown
from trainer.engine import StepOutcome, train_step
from trainer.exit_codes import EXIT_OK, EXIT_PREEMPTED
from trainer.inference import EvaluationStopped, evaluate
from trainer.progress import ProgressLine, format_eval, format_progress
from trainer.run import Run, start_run, take_run_lease
from trainer.stop_signal import StopSignal
from trainer.weights import save_weights

log = logging.getLogger("trainer.train")

TRACKER_CLOSE_SECONDS = 5.0  # at most this long sending what the MLflow tracker still holds; the rest is dropped


def train(config: Config, env: DistEnv, force: bool = False, stop: StopSignal | None = None,
          prefetch: LatestPrefetch | None = None) -> int:
    """Train the run ``config`` names; an exit code. The lease is given back however the run ends (a lost one is
    not touched)."""
    stop = stop or StopSignal().install()
    lease = take_run_lease(config, env)
    run = None
    try:
        run = start_run(config, env, stop, lease, prefetch, force)
        code = EXIT_PREEMPTED if run is None else train_epochs(run)
    except BaseException:
        if run is not None:  # the tracked run says so; a restarted job sets it running again
            run.tracker.finish("FAILED")
            run.tracker.close(timeout=TRACKER_CLOSE_SECONDS)
        raise  # the group is not left: a peer may be gone, and leaving could wait on it
    finally:
        if lease is not None:
            lease.release()
        stop.uninstall()
    del run  # the model, its DDP wrapper and the optimizer go before the group they used
    shutdown(env)
    return code


def train_epochs(run: Run) -> int:
    """Each epoch: train, evaluate, checkpoint. A stop agreed anywhere commits its checkpoint and ends here."""
    for epoch in range(run.start_epoch, run.config.schedule.epochs):
        if not run.training_done_for(epoch) and not run_epoch(run, epoch):
            return preempted(run)
        try:
            metric = evaluate_epoch(run, epoch) if run.evaluates_after(epoch) else None
        except EvaluationStopped:
            run.checkpointing.save_before_evaluation(epoch)
            return preempted(run)
        last = epoch + 1 == run.config.schedule.epochs or run.stops_early()
        if not run.checkpointing.after_epoch(epoch, metric, last):
            return preempted(run)
        if last:
            break
    return finish(run)


def run_epoch(run: Run, epoch: int) -> bool:
    """One epoch of optimizer steps, with progress lines and the checkpoints that fall due; False when a stop
    was agreed (its checkpoint is committed)."""
    run.data.sampler.set_epoch(epoch)  # keeps a restored position in the resumed epoch
    run.ddp.train()
    run.meter.restart_window()
    run.watchdog.beat()
    batches = len(run.data.loader)
    for index, (images, targets, metas) in enumerate(run.meter.fetched(run.data.loader)):
        outcome = train_batch(run, epoch, index, images, targets, metas)
        if not outcome.optimizer_stepped:
            continue
        if run.trainables.state.step % run.config.log.every_steps == 0 or index + 1 == batches:
            report_progress(run, epoch, outcome, len(images))
        if not run.checkpointing.after_step(epoch, index + 1, epoch_end=index + 1 == batches):
            return False
    run.clock.set(epoch + 1, 0)
    return True


def train_batch(run: Run, epoch: int, index: int, images: list[torch.Tensor], targets: list[dict],
                metas: list) -> StepOutcome:
    """One batch: forward, backward and (every ``train.accumulate`` batches) an optimizer step."""
    run.loader_stats.update(metas)
    t = run.trainables
    if run.trace is not None:
        run.trace.write(epoch, t.state.step, targets)
    run.clock.set(epoch, run.data.sampler.position_after(index + 1))  # what the schedule steps to
    outcome = train_step(run.ddp, t.optimizer, t.scheduler, images, targets, run.env.device, t.state,
                         accumulate=run.config.train.accumulate, clip_grad_norm=run.config.train.clip_grad_norm,
                         scaler=t.scaler, autocast_dtype=run.autocast_dtype, ema=t.ema,
                         max_nonfinite_in_a_row=run.config.train.max_nonfinite_steps)
    run.watchdog.beat()
    run.meter.count(len(images) * run.env.world_size)
    return outcome


def report_progress(run: Run, epoch: int, outcome: StepOutcome, batch_images: int) -> None:
    """The progress line (rank 0), its metrics record, and the check that a step fits the grace period."""
    reading = run.meter.read(run.clock.done)
    step, steps = run.clock.step_in_epoch()
    cuda = run.env.device.type == "cuda"
    line = ProgressLine(epoch + 1, run.config.schedule.epochs, step, steps, outcome.loss, outcome.terms,
                        run.trainables.optimizer.param_groups[0]["lr"], reading.images_per_s, reading.data_wait,
                        reading.eta_s, torch.cuda.max_memory_allocated(run.env.device) / 1e9 if cuda else None)
    if run.env.is_main:
        log.info("%s", format_progress(line))
    run.run_log.train({"epoch": epoch + 1, "step": run.trainables.state.step, "samples": run.clock.samples,
                       "progress": run.clock.done, "loss": outcome.loss, **outcome.terms, "lr": line.lr,
                       "images_per_s": line.images_per_s, "data_wait": line.data_wait,
                       **run.loader_stats.snapshot().as_dict()})
    step_seconds = batch_images * run.env.world_size / max(reading.images_per_s, 1e-9)
    run.checkpointing.check_grace(step_seconds, "one step")


def evaluate_epoch(run: Run, epoch: int) -> float | None:
    """This epoch's evaluation: its metric (None without a result), logged, and added to ``run.record`` (the best
    so far, which ``model_best.pt`` follows, and the count ``eval.patience`` watches).

    A stop request is agreed after every batch (so a long evaluation never outlasts the grace period); the
    watchdog is re-armed per batch and paused while rank 0 runs COCOeval.
    """
    config, env, validation = run.config, run.env, run.validation
    assert validation is not None  # evaluates_after() is False without a validation split
    if env.is_main:
        log.info("evaluating epoch %d on %s", epoch + 1, validation.coco_uri)
    run.watchdog.beat()
    batch_started = time.perf_counter()

    def after_batch() -> bool:
        nonlocal batch_started
        run.watchdog.beat()
        run.checkpointing.check_grace(time.perf_counter() - batch_started, "one evaluation batch")
        batch_started = time.perf_counter()
        if not run.checkpointing.stop_agreed():
            return False
        if env.is_main:
            log.warning("stop requested during the evaluation of epoch %d: it will run again after the resume",
                        epoch + 1)
        return True

    result = evaluate(run.evaluated, validation, env, run.autocast_dtype, should_stop=after_batch,
                      before_gather=run.watchdog.pause)
    metric: float | None = None
    if result is not None:
        metric = result.stats[config.eval.metric]
        improved = run.record.add(metric, config.eval.min_delta)
        note = f"best {config.eval.metric} so far" if improved else f"best {config.eval.metric} {run.best:.4f}"
        log.info("%s", format_eval(epoch + 1, result.stats, note, result.per_class))
        run.run_log.eval({"epoch": epoch + 1, "step": run.trainables.state.step, **result.stats,
                          "per_class_ap": result.per_class, "best": run.best,
                          "evals_without_improvement": run.record.stale_evals})
        if improved:
            run.fence()
            best_uri = storage.join(config.run_uri, "model_best.pt")
            save_weights(best_uri, run.evaluated.state_dict(), config.model, run.data.dataset.index)
            run.tracker.set_tags({"trainer.best_weights": best_uri, f"trainer.best_{config.eval.metric}": metric,
                                  "trainer.best_step": run.trainables.state.step})
    metric, run.record.best, run.record.stale_evals = broadcast_object(
        env, (metric, run.record.best, run.record.stale_evals))
    return metric


def finish(run: Run) -> int:
    """After the last epoch: ``model_final.pt`` and the closing line (rank 0)."""
    run.watchdog.pause()
    if run.env.is_main:
        final_uri = storage.join(run.config.run_uri, "model_final.pt")
        run.fence()
        save_weights(final_uri, run.evaluated.state_dict(), run.config.model, run.data.dataset.index)
        run.run_log.close()
        run.tracker.set_tags({"trainer.final_weights": final_uri})
        run.tracker.finish("FINISHED")
        run.tracker.close(timeout=TRACKER_CLOSE_SECONDS)
        log.info("finished %d steps in %.1f s (checkpoint stalls %.1f s); final weights: %s",
                 run.trainables.state.step, run.meter.elapsed, run.checkpointing.stall_seconds, final_uri)
    run.checkpointing.close()
    return EXIT_OK


def preempted(run: Run) -> int:
    """After the stop checkpoint: flush the logs and say so with EXIT_PREEMPTED."""
    run.checkpointing.close()
    run.run_log.close()
    run.tracker.finish("PREEMPTED")  # left running, tagged preempted: the restarted job continues it
    run.tracker.close(timeout=TRACKER_CLOSE_SECONDS)
    if run.env.is_main:
        since = time.monotonic() - run.stop.at if run.stop.at is not None else 0.0
        log.warning("stopped by %s: checkpoint committed %.1f s after the signal; exiting with code %d "
                    "(preempted) so the job restarts and resumes", run.stop.received or "a peer's signal", since,
                    EXIT_PREEMPTED)
    return EXIT_PREEMPTED
