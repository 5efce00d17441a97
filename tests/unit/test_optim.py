"""Optimizer groups (no decay on norms and biases) and the warm-up + cosine/multistep schedule over samples."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import SampleSchedule, build_optimizer, lr_factor, lr_scale


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
    factors = [lr_factor(i * 4, 200, 40, config) for i in range(100)]  # 4 samples a step, 50 steps an epoch
    assert factors[0] == pytest.approx(0.001) and factors[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in pairwise(factors[:11]))
    assert all(a >= b for a, b in pairwise(factors[10:])) and factors[-1] < 0.001
    assert lr_factor(400, 200, 40, config) == 0.0


def test_multistep_decays_at_epoch_milestones_and_the_scheduler_applies_it() -> None:
    config = ScheduleConfig(epochs=4, warmup_iters=0, kind="multistep", milestones=[2, 3], gamma=0.1)
    assert [lr_factor(i * 10, 10, 0, config) for i in range(4)] == pytest.approx([1, 1, 0.1, 0.01])
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, norm_weight_decay=None))
    samples = [0]
    scheduler = SampleSchedule(optimizer, config, 10, 1, clock=lambda: samples[0])
    for _ in range(20):
        optimizer.step()
        samples[0] += 1
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_curve_depends_on_samples_not_on_the_steps_that_consumed_them() -> None:
    """A resume on another world size (another global batch) continues the same curve: same samples, same LR."""
    config = ScheduleConfig(epochs=3, warmup_iters=5, kind="cosine")
    model = nn.Linear(2, 2)
    by_batch: dict[int, dict[int, float]] = {}
    for batch in (2, 4, 8):
        optimizer = build_optimizer(model, OptimConfig(lr=0.1, norm_weight_decay=None))
        samples = [0]
        # warm-up: 20 samples; the clock reads this iteration's counter
        scheduler = SampleSchedule(optimizer, config, 64, 4, clock=lambda samples=samples: samples[0])
        by_batch[batch] = {}
        while samples[0] < 3 * 64:
            samples[0] += batch
            scheduler.step()
            by_batch[batch][samples[0]] = optimizer.param_groups[0]["lr"]
    for samples, lr in by_batch[8].items():
        assert by_batch[2][samples] == lr and by_batch[4][samples] == lr


def test_a_restored_schedule_keeps_its_warm_up_in_samples_and_rescales_to_the_new_batch() -> None:
    config = ScheduleConfig(epochs=2, warmup_iters=10, kind="cosine")
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, norm_weight_decay=None))
    first = SampleSchedule(optimizer, config, 100, 8, clock=lambda: 40)  # warm-up of 80 samples
    first.step()
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, norm_weight_decay=None))  # the resumed process's
    resumed = SampleSchedule(optimizer, config, 100, 2, clock=lambda: 40)  # a quarter of the world size
    resumed.load_state_dict(first.state_dict())
    assert resumed.warmup_samples == 80 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (0.001 + 0.999 / 2))
    assert lr_scale(OptimConfig(scale_lr="linear", reference_batch=16), 32) == 2.0
    assert lr_scale(OptimConfig(scale_lr="sqrt", reference_batch=16), 64) == 2.0
    assert lr_scale(OptimConfig(scale_lr="none", reference_batch=16), 64) == 1.0
