"""trainer.checkpoint.state: RNG states round-trip through a weights_only checkpoint; config changes are classified;
the evaluation record (best metric, early-stopping count) is kept and checked."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import CheckpointError, LoadedCheckpoint
from trainer.checkpoint.state import (
    EvalRecord,
    check_config,
    check_resumable,
    config_changes,
    rng_state,
    set_rng_state,
    tracking_ids,
)
from trainer.config import ConfigError, load_config

DATA = ["data.train.coco=/d/train.json", "data.train.images=/d/images"]


def test_rng_states_survive_a_weights_only_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def checkpoint_of(overrides: list[str]) -> LoadedCheckpoint:
    config = load_config(None, [*DATA, *overrides])
    return LoadedCheckpoint("runs/x/checkpoints/step-000000010", 10, 0,
                            {"config": config.to_dict(), "config_digest": config.digest()}, {}, None)


def test_safe_changes_proceed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    check_config(checkpoint_of([]), load_config(None, [*DATA, "schedule.epochs=30", "log.every_steps=5",
                                                       "data.workers=8"]), force=False)
    assert "config changed since runs/x/checkpoints/step-000000010: data.workers, log.every_steps, " \
           "schedule.epochs" in caplog.text


@pytest.mark.parametrize("change", ["model.name=fasterrcnn_resnet50_fpn", "optim.lr=0.5", "data.batch_size=8",
                                    "data.train.coco=/other/train.json"])
def test_model_optimizer_and_data_changes_need_force(change: str) -> None:
    new = load_config(None, [*DATA, change])
    with pytest.raises(ConfigError, match=f"differs from the checkpoint's .* in {change.split('=')[0]}.*--force"):
        check_config(checkpoint_of([]), new, force=False)
    check_config(checkpoint_of([]), new, force=True)  # allowed when forced


def test_config_changes_lists_nested_keys() -> None:
    assert config_changes({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"b": 2, "c": [1]}, "e": 3}) == ["a.b", "d", "e"]


def test_eval_record_counts_evaluations_without_a_significant_rise() -> None:
    """eval.patience counts evaluations since the metric last rose by more than min_delta; model_best.pt still
    follows any rise, and a run of small rises does not reset the count."""
    record = EvalRecord()
    seen = [(record.add(metric, min_delta=0.01), record.stale_evals) for metric in (0.30, 0.305, 0.309, 0.40, 0.39)]
    assert seen == [(True, 0), (True, 1), (True, 2), (True, 0), (False, 1)]
    assert record.best == 0.40
    assert not record.exhausted(0) and not record.exhausted(2) and record.exhausted(1)


def _resumable_checkpoint(**state: object) -> LoadedCheckpoint:
    base = {"step": 10, "epoch": 1, "epoch_done": True, "loop": {}, "config": {"train": {"seed": 0}}}
    objects = {"model": {"model": {"w": torch.zeros(1)}}, "optimizer": {"optimizer": {}, "scheduler": {}},
               "rng": {"world_size": 1, "ranks": [{}]}}
    return LoadedCheckpoint("runs/x/checkpoints/step-000000010", 10, 1, {**base, **state}, objects, None)


@pytest.mark.parametrize("state", [{"best": "0.5"}, {"best": float("nan")}, {"best": True},
                                   {"stale_evals": -1}, {"stale_evals": 1.5}, {"stale_evals": "2"}])
def test_a_damaged_evaluation_record_makes_the_checkpoint_corrupt(state: dict[str, object]) -> None:
    """A tampered best metric or early-stopping count is refused before the resume (the previous checkpoint is
    used), instead of failing a comparison epochs later."""
    check_resumable(_resumable_checkpoint())  # the undamaged shape passes
    with pytest.raises(CheckpointError, match=r"best|stale_evals"):
        check_resumable(_resumable_checkpoint(**state))


RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("damaged", [
    {"mlflow_run_id": "../../runs/other"}, {"mlflow_run_id": 7}, {"mlflow_run_id": RUN_ID.upper()},
    {"mlflow_run_id": RUN_ID, "extra": "x"}, ["mlflow_run_id", RUN_ID], "0123",
])
def test_a_damaged_tracking_entry_is_ignored_with_a_warning_not_used(damaged: object,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert tracking_ids(damaged, "ckpt") == {}
    assert "not a valid MLflow run id" in caplog.text


def test_a_valid_or_absent_tracking_entry_is_kept_as_it_is() -> None:
    assert tracking_ids({"mlflow_run_id": RUN_ID}, "ckpt") == {"mlflow_run_id": RUN_ID}
    assert tracking_ids(None, "ckpt") == tracking_ids({}, "ckpt") == {}
