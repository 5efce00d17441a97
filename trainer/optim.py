"""Optimizer and learning-rate schedule from the config.

Norm layers and biases get their own weight decay (``optim.norm_weight_decay``, 0 by default: decaying them only
hurts, as torchvision's references and most detection recipes note). The schedule is a linear warm-up over
``warmup_iters`` iterations (converted to samples) followed by cosine decay to 0 or step decay at epoch
milestones, all as functions of the samples consumed (DESIGN.md: schedules follow samples, not steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig, ScheduleConfig

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
          nn.modules.instancenorm._InstanceNorm)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict]:
    """Trainable parameters split into (regular, norm-and-bias) groups with their weight decays."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    regular: list[nn.Parameter] = []
    special: list[nn.Parameter] = []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            (special if isinstance(module, _NORMS) or name == "bias" else regular).append(parameter)
    groups = [{"params": regular, "weight_decay": weight_decay}]
    if special:
        groups.append({"params": special, "weight_decay": norm_weight_decay})
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.norm_weight_decay)
    lr = config.lr * lr_scale
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(samples: int, epoch_samples: int, warmup_samples: int, config: ScheduleConfig) -> float:
    """The multiplier of the base learning rate once ``samples`` of the run's samples have been consumed.

    A function of the share of the run's samples, never of optimizer steps: a run resumed on another world size
    or ``accumulate`` (which changes the steps per epoch) continues the same curve, and multistep milestones fire
    at the same epoch boundary.
    """
    total = max(1, config.epochs * epoch_samples)
    warmup = min(warmup_samples, total - 1)
    if samples < warmup:
        start = 0.001
        return start + (1 - start) * samples / warmup
    if config.kind == "multistep":
        return config.gamma ** sum(samples >= m * epoch_samples for m in config.milestones)
    progress = (samples - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_scale(config: OptimConfig, global_batch: int) -> float:
    """``optim.scale_lr``: the base LR rescaled from ``optim.reference_batch`` to this run's global batch."""
    ratio = global_batch / config.reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.scale_lr]


class SampleSchedule:
    """Warm-up then cosine or multistep decay over the run's samples, stepped after each optimizer step.

    ``step()`` reads the samples consumed so far from ``clock`` (the training loop's data position, which is
    exact across world sizes). ``warmup_iters`` is converted to samples with the global batch of the run that
    started the schedule and kept in the state, so a resumed run on another world size warms up identically.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, epoch_samples: int,
                 samples_per_step: int, clock: Callable[[], int]) -> None:
        self.optimizer, self.config, self.clock = optimizer, config, clock
        self.epoch_samples = max(1, epoch_samples)
        self.warmup_samples = config.warmup_iters * samples_per_step
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.samples = 0
        self._apply()

    def factor(self, samples: int) -> float:
        return lr_factor(samples, self.epoch_samples, self.warmup_samples, self.config)

    def step(self) -> None:
        self.samples = int(self.clock())
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.samples)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "warmup_samples": self.warmup_samples, "epoch_samples": self.epoch_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved curve (the base LRs stay this run's: ``optim.scale_lr`` may rescale them)."""
        if int(state["epoch_samples"]) != self.epoch_samples:
            raise ValueError(f"the schedule was made for {state['epoch_samples']} samples per epoch, this data set "
                             f"has {self.epoch_samples}")
        self.warmup_samples = int(state["warmup_samples"])
        self.samples = int(state["samples"])
        self._apply()
