"""The training step: uint8→float on the device, accumulation, clipping, EMA, and the non-finite loss guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.engine import ModelEma, NonFiniteLossError, TrainState, predict_batches, to_device, train_step


class TinyDetector(nn.Module):
    """A stand-in with a detector's interface: losses in train mode, detections in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.poison = False

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):  # type: ignore[no-untyped-def]
        mean = torch.stack([im.mean() for im in images]).mean()
        if self.training:
            loss = (self.scale * mean - 2.0) ** 2
            return {"loss_a": loss * float("nan") if self.poison else loss, "loss_b": 0.1 * self.scale.abs().sum()}
        return [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([1]), "scores": self.scale * mean}
                for _ in images]


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    return [torch.full((3, 8, 8), 255, dtype=torch.uint8)], [{"boxes": torch.zeros(1, 4), "image_id": 1}]


def step(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, **kwargs: object):  # type: ignore[no-untyped-def]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return train_step(model, optimizer, scheduler, *batch(), torch.device("cpu"), state, **kwargs)  # type: ignore[arg-type]


def test_uint8_images_become_unit_floats_on_the_device() -> None:
    images, targets = to_device(*batch(), torch.device("cpu"))
    assert images[0].dtype == torch.float32 and float(images[0].max()) == 1.0 and targets[0]["image_id"] == 1


def test_accumulation_steps_the_optimizer_every_n_batches_and_ema_follows() -> None:
    model = TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    ema = ModelEma(model, decay=0.5, warmup_steps=1)
    outcomes = [step(model, optimizer, state, accumulate=2, clip_grad_norm=1.0, ema=ema) for _ in range(4)]
    assert [o.optimizer_stepped for o in outcomes] == [False, True, False, True] and state.step == 2
    assert float(model.scale.detach()) != 1.0
    ema_scale, model_scale = float(ema.module.scale), float(model.scale.detach())
    assert 1.0 > ema_scale > model_scale or 1.0 < ema_scale < model_scale
    assert set(outcomes[0].terms) == {"loss_a", "loss_b"}


def test_non_finite_losses_are_skipped_then_stop_the_run() -> None:
    model = TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    model.poison = True
    for _ in range(2):
        assert not step(model, optimizer, state, max_nonfinite_in_a_row=3).finite
    assert float(model.scale.detach()) == 1.0  # nothing was applied
    model.poison = False
    assert step(model, optimizer, state, max_nonfinite_in_a_row=3).finite and state.nonfinite_in_a_row == 0
    model.poison = True
    with pytest.raises(NonFiniteLossError, match="not finite for 3 steps in a row"):
        for _ in range(3):
            step(model, optimizer, state, max_nonfinite_in_a_row=3)


def test_prediction_runs_in_eval_mode_and_restores_training() -> None:
    model = TinyDetector().train()
    outputs = list(predict_batches(model, [(*batch(), None)], torch.device("cpu")))
    assert model.training and outputs[0][0][0]["labels"].tolist() == [1]


def test_each_skipped_step_is_logged_with_rank_step_and_term(caplog: pytest.LogCaptureFixture) -> None:
    model = TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    model.poison = True
    with caplog.at_level("WARNING"):
        for _ in range(2):
            step(model, optimizer, state, max_nonfinite_in_a_row=5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("rank 0 step 1: not finite: loss_a=nan; step skipped (1 in a row")
    assert "train.max_nonfinite_steps=5" in lines[1] and "(2 in a row" in lines[1]


def test_default_limit_is_twenty_consecutive_skips() -> None:
    model = TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    model.poison = True
    for _ in range(19):
        step(model, optimizer, state)
    with pytest.raises(NonFiniteLossError, match="20 steps in a row"):
        step(model, optimizer, state)


def test_non_finite_gradients_with_a_finite_loss_never_reach_the_weights(caplog: pytest.LogCaptureFixture) -> None:
    """lr=inf-like divergence shows first in the gradients: the step is skipped, the weights stay finite, and the
    run stops after the limit instead of writing NaN weights."""
    model = TinyDetector()
    model.scale.register_hook(lambda grad: grad * float("inf"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    for clip in (None, 10.0):
        outcome = step(model, optimizer, state, clip_grad_norm=clip, max_nonfinite_in_a_row=3)
        assert outcome.finite is False and not outcome.optimizer_stepped and state.step == 0
    assert float(model.scale.detach()) == 1.0 and "gradient norm=inf" in caplog.text
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        step(model, optimizer, state, max_nonfinite_in_a_row=3)
