"""One training step and one evaluation pass: the numerical core, with no I/O decisions.

The training loop (trainer/train.py) decides what to log, when to checkpoint and where outputs go; here a step
moves a batch to the device (uint8 images become float in [0, 1] there), runs the model under autocast, skips
a step whose loss or gradients are not finite (each skip logged with the rank, step and loss terms; after
``max_nonfinite_in_a_row`` in a row it stops with NonFiniteLossError, so NaN never reaches the weights),
accumulates gradients, clips, steps the optimizer and schedule, and updates the EMA weights.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf losses or gradients too many times in a row: stopping beats silently training on
    NaN. A run that restarting cannot fix (the same data and settings diverge again): exit 2 in trainer.train."""


def to_device(images: Sequence[torch.Tensor], targets: Sequence[dict[str, Any]], device: torch.device,
              ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    moved = []
    for image in images:
        image = image.as_subclass(torch.Tensor).to(device, non_blocking=True)
        moved.append(image.float().div_(255) if image.dtype == torch.uint8 else image.float())
    targets_out = [{k: (v.as_subclass(torch.Tensor).to(device, non_blocking=True) if isinstance(v, torch.Tensor)
                        else v) for k, v in t.items()} for t in targets]
    return moved, targets_out


@dataclass
class StepOutcome:
    loss: float
    terms: dict[str, float]
    finite: bool
    optimizer_stepped: bool


@dataclass
class TrainState:
    """Counters the loop keeps across steps (and checkpoints)."""

    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # batches seen (accumulation)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    history: list[float] = field(default_factory=list)


class ModelEma:
    """Exponential moving average of the weights (a full copy of the model: evaluate and save it directly).

    The decay ramps up over ``warmup_steps`` so the first, noisy steps do not dominate the average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup_steps: int = 2000) -> None:
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.warmup_steps))
        source = _unwrap(model).state_dict()
        for key, shadow in self.module.state_dict().items():
            value = source[key].detach()
            if shadow.dtype.is_floating_point:
                shadow.mul_(decay).add_(value, alpha=1 - decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's .module is the wrapped Module (nn.Module.__getattr__ is typed as returning Tensor | Module)
    return cast(nn.Module, model.module) if hasattr(model, "module") else model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, images: Sequence[torch.Tensor],
               targets: Sequence[dict[str, Any]], device: torch.device, state: TrainState, *,
               accumulate: int = 1, clip_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None,
               autocast_dtype: torch.dtype | None = None, ema: ModelEma | None = None,
               max_nonfinite_in_a_row: int = 20) -> StepOutcome:
    """One batch: forward, backward, and every ``accumulate`` batches an optimizer + schedule step.

    Every rank decides to skip together (one tiny all-reduce), or DDP's next collective would hang."""
    images_d, targets_d = to_device(images, targets, device)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss_dict = model(images_d, targets_d)
    loss = sum(loss_dict.values())
    terms = {name: float(value.detach()) for name, value in loss_dict.items()}
    total = float(loss.detach())
    state.micro_step += 1
    if not _all_finite(math.isfinite(total)):  # every rank skips together, or DDP's backward would hang
        bad = [f"{name}={value}" for name, value in terms.items() if not math.isfinite(value)]
        _skip(state, optimizer, ", ".join(bad) if bad else "another rank's loss", max_nonfinite_in_a_row)
        return StepOutcome(total, terms, False, False)
    scaled = loss / accumulate
    if scaler is not None:
        scaler.scale(scaled).backward()
    else:
        scaled.backward()
    if state.micro_step % accumulate != 0:
        return StepOutcome(total, terms, True, False)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm) if clip_grad_norm
                 else torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    # fp16's GradScaler skips steps with inf gradients itself (and lowers its scale): that is not divergence.
    if scaler is None and not _all_finite(math.isfinite(norm)):
        _skip(state, optimizer, f"gradient norm={norm}", max_nonfinite_in_a_row)
        return StepOutcome(total, terms, False, False)
    state.nonfinite_in_a_row = 0
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state.step += 1
    if ema is not None:
        ema.update(model)
    return StepOutcome(total, terms, True, True)


def _skip(state: TrainState, optimizer: torch.optim.Optimizer, what: str, limit: int) -> None:
    """Drop this step's gradients, log it, and stop after ``limit`` skips in a row."""
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    optimizer.zero_grad(set_to_none=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    log.warning("rank %d step %d: not finite: %s; step skipped (%d in a row, the run stops at "
                "train.max_nonfinite_steps=%d)", rank, state.step + 1, what, state.nonfinite_in_a_row, limit)
    if state.nonfinite_in_a_row >= limit:
        raise NonFiniteLossError(
            f"the loss or gradients were not finite for {state.nonfinite_in_a_row} steps in a row (last: {what}); "
            "stopping: lower optim.lr, raise schedule.warmup_iters or check the data (data.mean/std, boxes)")


def _all_finite(finite: bool) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce when a process group exists)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return finite
    flag = torch.tensor([1.0 if finite else 0.0])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def predict_batches(model: nn.Module, batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict[str, Any]], Any]],
                    device: torch.device, autocast_dtype: torch.dtype | None = None,
                    ) -> Iterable[tuple[list[dict[str, torch.Tensor]], Sequence[dict[str, Any]]]]:
    """Model outputs (on the CPU) for each batch, in eval mode; yields (outputs, targets)."""
    was_training = model.training
    model.eval()
    try:
        for images, targets, _ in batches:
            images_d, _ = to_device(images, [], device)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = model(images_d)
            yield [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
                   for o in outputs], targets
    finally:
        model.train(was_training)
