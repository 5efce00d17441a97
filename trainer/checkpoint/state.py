"""What a training checkpoint holds and how a run continues from one, exactly where it stopped.

State: model (and EMA), optimizer, LR schedule, AMP scaler, loop counters, the sampler's data position, the RNG
states of every rank (torch, CUDA, numpy, python), epoch, best metric, the config and library versions. With the
same world size and deterministic settings, a resumed run computes the same numbers as an uninterrupted one; with
another world size the data order continues (no sample of the interrupted epoch repeated or skipped) and the RNG
streams restart from the seed.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from trainer import __version__
from trainer.checkpoint import CheckpointError, LoadedCheckpoint, Snapshot, cpu_copy
from trainer.config import Config, ConfigError
from trainer.data.sampler import ResumableDistributedBatchSampler
from trainer.distributed import DistEnv, all_gather_objects
from trainer.engine import ModelEma, TrainState

log = logging.getLogger(__name__)

# Keys a resumed run may change without --force: they do not change what is learned (or only its length).
SAFE_TO_CHANGE = ("run.dir", "schedule.epochs", "log.", "eval.", "checkpoint.", "data.workers", "data.cache_dir",
                  "data.cache_gb", "data.val.", "train.timeout_minutes", "train.hang_timeout_seconds")


@dataclass
class Trainables:
    """The objects whose state a checkpoint holds."""

    model: nn.Module  # unwrapped (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    sampler: ResumableDistributedBatchSampler
    ema: ModelEma | None = None
    scaler: torch.amp.GradScaler | None = None


@dataclass
class EvalRecord:
    """The run's evaluation history that a checkpoint keeps: the best ``eval.metric`` so far, and the evaluations
    since it last rose by more than ``eval.min_delta`` (what ``eval.patience`` counts)."""

    best: float | None = None
    stale_evals: int = 0

    def add(self, metric: float, min_delta: float) -> bool:
        """Record one evaluation; True when it is the best so far (it becomes model_best.pt)."""
        significant = self.best is None or metric > self.best + min_delta
        self.stale_evals = 0 if significant else self.stale_evals + 1
        improved = self.best is None or metric > self.best
        self.best = metric if improved else self.best
        return improved

    def exhausted(self, patience: int) -> bool:
        """Early stopping is due (``patience`` 0: never)."""
        return patience > 0 and self.stale_evals >= patience


@dataclass
class ResumePoint:
    epoch: int  # the epoch to run next (its sampler already positioned)
    record: EvalRecord
    step: int
    pending_eval: bool = False  # stopped during this epoch's evaluation: evaluate it before anything else
    tracking: dict[str, str] = field(default_factory=dict)  # e.g. the MLflow run id this run logs to


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ------------------------------------------------------------------------------------------------ saving
def take_snapshot(t: Trainables, env: DistEnv, config: Config, *, epoch: int, epoch_done: bool,
                  consumed_batches: int, record: EvalRecord, metric: float | None,
                  classes: dict[str, list[Any]] | None = None, eval_pending: bool = False,
                  tracking: dict[str, str] | None = None) -> Snapshot | None:
    """A CPU copy of the whole training state (a collective: every rank calls it at the same step; rank 0 gets
    the snapshot, the others None)."""
    rngs = all_gather_objects(env, rng_state())
    if not env.is_main:
        return None
    objects: dict[str, Any] = {
        "model": {"model": cpu_copy(t.model.state_dict()), "ema": cpu_copy(t.ema.state_dict()) if t.ema else None},
        "optimizer": {"optimizer": cpu_copy(t.optimizer.state_dict()), "scheduler": cpu_copy(t.scheduler.state_dict()),
                      "scaler": cpu_copy(t.scaler.state_dict()) if t.scaler else None},
        "rng": {"world_size": env.world_size, "ranks": rngs},
    }
    state = {
        "step": t.state.step, "epoch": epoch, "epoch_done": epoch_done, "eval_pending": eval_pending,
        "loop": {k: v for k, v in asdict(t.state).items() if k != "history"},
        "sampler": t.sampler.state_dict(consumed_batches=consumed_batches) if not epoch_done else None,
        "best": record.best, "stale_evals": record.stale_evals, "metric": metric, "world_size": env.world_size,
        "classes": classes, "tracking": dict(tracking or {}),
        "config": config.to_dict(), "config_digest": config.digest(),
        "versions": {"trainer": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    return Snapshot(t.state.step, epoch, objects, state, metric)


# ------------------------------------------------------------------------------------------------ loading
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


def _safe_to_change(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)


def check_config(checkpoint: LoadedCheckpoint, config: Config, force: bool) -> None:
    """A changed config is reported; changes beyond SAFE_TO_CHANGE need ``--force``."""
    if checkpoint.state.get("config_digest") == config.digest():
        return
    changed = config_changes(checkpoint.state.get("config") or {}, config.to_dict())
    risky = [key for key in changed if not _safe_to_change(key)]
    if risky and not force:
        raise ConfigError(f"the config differs from the checkpoint's {checkpoint.uri} in {', '.join(risky)}: "
                          "resuming would not continue the same training; pass --force to resume anyway, or use "
                          "another run.name")
    log.warning("config changed since %s: %s%s", checkpoint.uri, ", ".join(changed),
                " (resuming anyway: --force)" if risky else "")


def _shape_problem(checkpoint: LoadedCheckpoint) -> str | None:
    """What a training checkpoint lacks for ``restore``, or None (checked before it is chosen, so a damaged one
    is skipped for the previous good one instead of failing the restore)."""
    state, objects = checkpoint.state, checkpoint.objects
    for key, kind in (("step", int), ("epoch", int), ("epoch_done", bool), ("loop", dict), ("config", dict)):
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            return f"state.json: '{key}' is {state.get(key)!r}"
    best, stale = state.get("best"), state.get("stale_evals", 0)
    if best is not None and not (isinstance(best, int | float) and not isinstance(best, bool) and math.isfinite(best)):
        return f"state.json: 'best' is {best!r}, not a finite number"
    if not isinstance(stale, int) or isinstance(stale, bool) or stale < 0:
        return f"state.json: 'stale_evals' is {stale!r}, not a count"
    if not state["epoch_done"] and not isinstance(state.get("sampler"), dict):
        return "state.json: a mid-epoch checkpoint without its data position ('sampler')"
    if not isinstance(state["config"].get("train"), dict) or not isinstance(state["config"]["train"].get("seed"),
                                                                           int):
        return "state.json: the config has no train.seed"
    model, optim, rng = (objects.get(k) for k in ("model", "optimizer", "rng"))
    if not isinstance(model, dict) or not isinstance(model.get("model"), dict) or not model["model"]:
        return "model.pt holds no model state"
    if not isinstance(optim, dict) or not all(isinstance(optim.get(k), dict) for k in ("optimizer", "scheduler")):
        return "optimizer.pt holds no optimizer and schedule state"
    if not isinstance(rng, dict) or not isinstance(rng.get("world_size"), int) or not isinstance(
            rng.get("ranks"), list) or len(rng["ranks"]) != rng["world_size"]:
        return "rng.pt does not hold one random state per rank"
    return None


def check_resumable(checkpoint: LoadedCheckpoint) -> None:
    """A CheckpointError (the checkpoint is CORRUPT) unless it holds everything a resume restores."""
    problem = _shape_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint.uri}: {problem}")


def restore(t: Trainables, checkpoint: LoadedCheckpoint, env: DistEnv) -> ResumePoint:
    """Load a verified checkpoint into the trainables; returns where the loop continues."""
    state = checkpoint.state
    model_state = checkpoint.objects["model"]
    t.model.load_state_dict(model_state["model"])
    if t.ema is not None:
        if model_state.get("ema"):
            t.ema.load_state_dict(model_state["ema"])
        else:
            log.warning("the checkpoint has no EMA weights; the EMA starts again from the current weights")
            t.ema.module.load_state_dict(model_state["model"])
    optim_state = checkpoint.objects["optimizer"]
    t.optimizer.load_state_dict(optim_state["optimizer"])
    t.scheduler.load_state_dict(optim_state["scheduler"])
    if t.scaler is not None and optim_state.get("scaler"):
        t.scaler.load_state_dict(optim_state["scaler"])
    for key, value in state["loop"].items():
        setattr(t.state, key, value)
    epoch = int(state["epoch"])
    pending_eval = bool(state.get("eval_pending")) and bool(state["epoch_done"])
    if pending_eval:
        t.sampler.set_epoch(epoch)  # the epoch's training is done; only its evaluation is left
    elif state["epoch_done"]:
        epoch += 1
    else:
        t.sampler.set_epoch(epoch)
        try:
            t.sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise ConfigError(f"{checkpoint.uri}: its data position does not fit this data set ({exc})") from exc
    rng = checkpoint.objects["rng"]
    if rng["world_size"] == env.world_size:
        set_rng_state(rng["ranks"][env.rank])
        same = "same world size: random streams restored"
    else:
        seed = int(state["config"]["train"]["seed"]) + env.rank + 1_000_003 * t.state.step
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        same = (f"world size {rng['world_size']} -> {env.world_size}: data order continues exactly, random "
                "streams re-seeded")
    where = (f"the evaluation of epoch {epoch + 1}, which runs again" if pending_eval else
             f"start of epoch {epoch + 1}" if state["epoch_done"] else
             f"epoch {epoch + 1}, {t.sampler.state_dict()['position']} samples into it")
    log.info("resumed from %s: step %d, %s (%s)", checkpoint.uri, t.state.step, where, same)
    record = EvalRecord(state.get("best"), int(state.get("stale_evals", 0)))  # absent: a checkpoint from before
    return ResumePoint(epoch, record, t.state.step, pending_eval, tracking_ids(state.get("tracking"), checkpoint.uri))


TRACKING_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


def tracking_ids(value: Any, source: str) -> dict[str, str]:
    """The experiment-tracking ids a checkpoint names. They are not training state: a damaged entry is ignored
    with a warning (the run then starts a new tracked run) instead of making the checkpoint CORRUPT."""
    if value is None:
        return {}  # a checkpoint from before tracking
    run_id = value.get("mlflow_run_id") if isinstance(value, dict) else None
    if isinstance(value, dict) and set(value) <= {"mlflow_run_id"} and (
            run_id is None or (isinstance(run_id, str) and TRACKING_ID.fullmatch(run_id))):
        return {"mlflow_run_id": run_id} if run_id else {}
    log.warning("%s: its tracking entry is not a valid MLflow run id; ignored (a new MLflow run starts)", source)
    return {}
