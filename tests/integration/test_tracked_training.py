"""A tracked training run (``log.mlflow``) against a real ``mlflow server`` on 127.0.0.1: killed with -9 and
started again it stays one MLflow run, each step logged once, and a tracking server that fails mid-run costs the
run nothing."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.test_resume import Run, overrides
from tests.integration.test_run_integrity import start_single
from tests.support.fault_proxy import FaultPlan, FaultProxy
from tests.support.mlflow_server import MlflowServer
from trainer.progress import parse_progress
from trainer.synth import make_shapes_dataset

pytestmark = pytest.mark.slow

TRACKING_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def wait_until(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def line_after(run: Run, mark: int, predicate: Callable[[str], bool], timeout: float = 120.0) -> str:
    """The first line from index ``mark`` on that ``predicate`` accepts (waiting for it, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((line for line in run.lines[mark:] if predicate(line)), None)
        if found is not None:
            return found
        assert run.proc.poll() is None and time.monotonic() < deadline, "\n".join(run.lines[-40:])
        time.sleep(0.1)


def test_a_killed_and_resumed_run_is_one_mlflow_run_with_each_step_once_through_a_server_outage(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    url = mlflow_server.ensure_running().url
    data = make_shapes_dataset(str(tmp_path / "shapes"), n=24, size=96, seed=3)
    shapes = {"train": data.train_uri, "val": data.val_uri, "images": data.images_uri}
    experiment = f"tracked-{tmp_path.name}"
    client = MlflowClient(tracking_uri=url)
    host, port = url.removeprefix("http://").split(":")
    with FaultProxy(host, int(port), FaultPlan()) as proxy:
        args = overrides(shapes, tmp_path, "schedule.epochs=3", "data.workers=0", "checkpoint.keep_last=10",
                         f"log.mlflow.tracking_uri={proxy.url}", f"log.mlflow.experiment={experiment}")

        killed = start_single(args, TRACKING_ENV)
        wait_until(lambda: bool(client.search_runs([client.get_experiment_by_name(experiment).experiment_id]))
                   if client.get_experiment_by_name(experiment) else False)
        # A checkpoint snapshotted once the run exists holds its id (one taken before, while the tracker was still
        # creating the run, does not): wait for one, for its commit, and for one more step; then kill.
        mark = len(killed.lines)
        snapshot = line_after(killed, mark, lambda line: "checkpoint step " in line)
        step = int(re.search(r"checkpoint step (\d+):", snapshot)[1])  # type: ignore[index]
        line_after(killed, mark, lambda line: "checkpoint committed" in line and f"step-{step:09d}" in line)
        line_after(killed, len(killed.lines), lambda line: parse_progress(line) is not None)
        killed.proc.kill()
        killed.finish()

        resumed = start_single(args, TRACKING_ENV)
        resumed.wait_for(lambda line: "resumed from" in line)
        proxy.plan = FaultPlan(error_rate=1.0, error_statuses=(503,))  # the tracking server fails ...
        resumed.wait_for(lambda line: "epoch 3/3" in line)
        proxy.plan = FaultPlan()  # ... and comes back: what was queued arrives
        assert resumed.finish() == 0, resumed.output[-3000:]

    assert "MLflow" in resumed.output  # the outage was reported, as a warning, not an error
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainer.final_weights"].endswith("model_final.pt")
    assert run.data.tags["trainer.best_weights"].endswith("model_best.pt")
    assert run.data.params["model.name"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    last_step = max(steps)
    assert steps == sorted(set(steps)) and steps == list(range(1, last_step + 1))  # each step once, in order
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/AP")] == sorted(
        {m.step for m in client.get_metric_history(run.info.run_id, "eval/AP")})
    assert len(client.get_metric_history(run.info.run_id, "eval/AP")) == 3  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/map.png"} <= artifacts
