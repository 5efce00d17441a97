"""trainer.run_log: metrics.jsonl survives restarts and drops redone steps; plots follow evaluations;
TensorBoard event files land in the run folder and leave nothing behind in /tmp."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.run_log import RunLog


def eval_record(epoch: int, ap: float) -> dict[str, object]:
    return {"epoch": epoch, "step": epoch * 10, "AP": ap, "AP50": ap + 0.2, "AP75": ap, "per_class_ap": {"a": ap}}


def test_metrics_plots_and_tensorboard(tmp_path: Path) -> None:
    run = RunLog(str(tmp_path), active=True, tensorboard=True)
    for step in range(1, 21):
        run.train({"epoch": 1 + step // 10, "step": step, "loss": 2.0 / step, "loss_classifier": 1.0 / step,
                   "lr": 0.01})
    run.eval(eval_record(1, 0.3))
    assert run.tensorboard is not None
    staging = Path(run.tensorboard.local)
    assert any(staging.iterdir())
    run.close()
    assert not staging.exists()  # the events were copied into the run; nothing is left behind in /tmp
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("train") == 20 and records[-1]["kind"] == "eval"
    for name in ("loss.png", "lr.png", "map.png", "per_class_ap.png"):
        with Image.open(tmp_path / "plots" / name) as picture:
            assert picture.format == "PNG"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/AP", "eval/AP_a"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("eval/AP")] == [0.30000001192092896]


def test_a_resumed_run_keeps_history_and_forgets_redone_steps(tmp_path: Path) -> None:
    first = RunLog(str(tmp_path), active=True)
    for step in range(1, 11):
        first.train({"step": step, "loss": 1.0})
    first.close()
    resumed = RunLog(str(tmp_path), active=True)
    resumed.forget_after(6)  # the checkpoint was at step 6: steps 7-10 run again
    resumed.train({"step": 7, "loss": 0.5})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_inactive_ranks_write_nothing(tmp_path: Path) -> None:
    run = RunLog(str(tmp_path / "run"), active=False, tensorboard=True)
    run.train({"step": 1, "loss": 1.0})
    run.eval(eval_record(1, 0.1))
    run.close()
    assert not (tmp_path / "run").exists()


def test_metrics_jsonl_stays_strict_json_when_values_are_not_finite(tmp_path: Path) -> None:
    run = RunLog(str(tmp_path), active=True)
    run.train({"step": 1, "loss": float("inf"), "loss_a": float("nan"), "lr": 0.1})
    run.eval({"epoch": 1, "step": 1, "AP": float("nan"), "per_class_ap": {"a": float("-inf"), "b": 0.5}})
    run.close()

    def refuse(token: str) -> float:
        raise ValueError(f"not JSON: {token}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert records[0]["loss"] is None and records[0]["loss_a"] is None and records[0]["lr"] == 0.1
    assert records[1]["AP"] is None and records[1]["per_class_ap"] == {"a": None, "b": 0.5}
