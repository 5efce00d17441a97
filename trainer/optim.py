"""Optimizer and learning-rate schedule from the config, both stepped per iteration.

Norm layers and biases get their own weight decay (``optim.norm_weight_decay``, 0 by default: decaying them only
hurts, as torchvision's references and most detection recipes note). The schedule is a linear warm-up over
``warmup_iters`` iterations followed by cosine decay to 0 or step decay at epoch milestones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig, ScheduleConfig

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
          nn.modules.instancenorm._InstanceNorm)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict]:
    """Trainable parameters split into (regular, norm-and-bias) groups with their weight decays."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    regular, special = [], []
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


def lr_factor(iteration: int, steps_per_epoch: int, config: ScheduleConfig) -> float:
    """The multiplier of the base learning rate at ``iteration`` (0-based optimizer steps)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_iters, total - 1)
    if iteration < warmup:
        start = 0.001
        return start + (1 - start) * iteration / warmup
    if config.kind == "multistep":
        epoch = iteration // max(1, steps_per_epoch)
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    progress = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, steps_per_epoch, config))
