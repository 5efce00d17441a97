"""Optimizer groups (no decay on norms and biases) and the per-iteration warm-up + cosine/multistep schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_norms_and_biases_get_their_own_weight_decay_and_frozen_parameters_are_left_out() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, norm_weight_decay=0.0))
    regular, special = optimizer.param_groups
    assert {id(p) for p in regular["params"]} == {id(model[2].weight)} and regular["weight_decay"] == 1e-4
    assert {id(p) for p in special["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                  id(model[2].bias)} and special["weight_decay"] == 0.0
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=0.001, norm_weight_decay=None))
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1


def test_warmup_then_cosine_to_zero() -> None:
    config = ScheduleConfig(epochs=2, warmup_iters=10, kind="cosine")
    factors = [lr_factor(i, 50, config) for i in range(100)]
    assert factors[0] == pytest.approx(0.001) and factors[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11], strict=True))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.001


def test_multistep_decays_at_epoch_milestones_and_the_scheduler_applies_it() -> None:
    config = ScheduleConfig(epochs=4, warmup_iters=0, kind="multistep", milestones=[2, 3], gamma=0.1)
    assert [lr_factor(i * 10, 10, config) for i in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, norm_weight_decay=None))
    scheduler = build_scheduler(optimizer, 10, config)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
