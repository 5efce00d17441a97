"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1: what a run gets, a resumed job continuing its
run without logging a step twice, and a server that is down, failing or slow costing training nothing."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fault_proxy import FaultPlan, FaultProxy
from tests.support.mlflow_server import MlflowServer
from trainer.config import Config, MlflowConfig
from trainer.tracking import MAX_PARAM_CHARS, MlflowTracker, flatten_params

mlflow_tracking = pytest.importorskip("mlflow.tracking")

RUN_URI = "s3://bucket/runs/exp1"
FAST = 3.0  # seconds for 10,000 calls: ~0.3 s idle, 1.3 s seen on a loaded CI; one wait on the server costs more


def make_tracker(url: str, **kwargs: Any) -> MlflowTracker:
    config = MlflowConfig(tracking_uri=url, experiment=f"test-{uuid.uuid4().hex[:8]}")
    return MlflowTracker(config, RUN_URI, "exp1", **kwargs)


def params() -> dict[str, Any]:
    """The resolved config, with enough model options for two params batches and one over-long value."""
    tree = Config().to_dict()
    tree["model"]["options"] = {f"option_{i}": i for i in range(80)}
    tree["run"]["dir"] = "s3://bucket/" + "x" * 7000
    return tree


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def steps(client: Any, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


@pytest.fixture
def client(mlflow_url: str) -> Any:
    return mlflow_tracking.MlflowClient(tracking_uri=mlflow_url)


@pytest.fixture
def closed_url() -> Iterator[str]:
    """An address where nothing listens, and nothing can start to during the test: this socket holds the port
    without listening, so every connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    caplog.set_level(logging.INFO, logger="trainer.tracking")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "trainer.tracking" and r.levelno >= 30]


def test_a_run_gets_its_params_metrics_tags_and_artifacts(mlflow_url: str, client: Any, tmp_path: Path) -> None:
    tracker = make_tracker(mlflow_url)
    tracker.start(None, params())
    for step in range(30):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.02, "nan": float("nan"), "text": "x"}, step)
    tracker.log_metrics({"AP": 0.25}, 29)
    tracker.set_tags({"trainer.world_size": 4})
    tracker.log_artifact_bytes("plots/loss.png", b"first")
    tracker.log_artifact_bytes("plots/loss.png", b"\x89PNG newer")  # replaces the queued copy
    tracker.finish("FINISHED")
    tracker.close(timeout=30)
    assert tracker.run_id is not None
    run = client.get_run(tracker.run_id)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "exp1")
    assert run.data.tags["trainer.run_uri"] == RUN_URI and run.data.tags["trainer.state"] == "finished"
    assert run.data.tags["trainer.world_size"] == "4"
    assert run.data.params == flatten_params(params())  # 150 params: two batches
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["model.freeze"] == "[]"
    assert len(run.data.params["run.dir"]) == MAX_PARAM_CHARS
    assert steps(client, tracker.run_id, "loss") == list(range(30)) and steps(client, tracker.run_id, "AP") == [29]
    assert set(run.data.metrics) == {"loss", "lr", "AP"}  # NaN and text are skipped
    assert tracker.counters.skipped_values == 60
    folder = client.download_artifacts(tracker.run_id, "plots", str(tmp_path))
    assert (Path(folder) / "loss.png").read_bytes() == b"\x89PNG newer"


def test_a_resumed_job_continues_its_run_without_logging_a_step_twice(mlflow_url: str, client: Any) -> None:
    first = make_tracker(mlflow_url)
    first.start(None, params())
    for step in range(20):
        first.log_metrics({"loss": float(step)} | ({"AP": step / 100} if step % 5 == 4 else {}), step)
    first.finish("PREEMPTED")
    first.close(timeout=30)
    run_id = first.run_id
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["trainer.state"] == "preempted"

    # The job restarts from a checkpoint of step 9: it redoes steps 10..19 (other values mark them) and goes on.
    second = MlflowTracker(first.config, RUN_URI, "exp1")
    second.start(run_id, params() | {"extra": {"key": 1}})
    for step in [*range(10, 30), 25]:  # 25 twice within the process, too
        second.log_metrics({"loss": 1000.0 + step} | ({"AP": step / 100} if step % 5 == 4 else {}), step)
    second.finish("FINISHED")
    second.close(timeout=30)
    assert second.run_id == run_id
    assert steps(client, run_id, "loss") == list(range(30))
    assert steps(client, run_id, "AP") == [4, 9, 14, 19, 24, 29]
    values = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert values[19] == 19.0 and values[20] == 1020.0  # the first job's points stand
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trainer.state"] == "finished"
    assert run.data.params["extra.key"] == "1" and len(run.data.params) == len(flatten_params(params())) + 1
    assert second.counters.repeated_steps == 10 + 2 + 1  # loss 10..19, AP 14 and 19, the second 25


def test_a_restart_whose_checkpoint_does_not_name_the_run_continues_the_unfinished_one(mlflow_url: str,
                                                                                       client: Any) -> None:
    """Killed after its run was created but before a checkpoint recorded the id: the restart must not open a
    second run. A finished run, or another run folder's, is never continued."""
    killed = make_tracker(mlflow_url)
    killed.start(None, params())
    for step in range(10):
        killed.log_metrics({"loss": float(step)}, step)
    killed.close(timeout=30)  # no finish(): the run stays RUNNING, as after a kill -9
    run_id = killed.run_id
    assert run_id is not None

    other_folder = MlflowTracker(killed.config, RUN_URI + "-other", "other")  # same experiment, another run
    other_folder.start(None, {"a": 1})
    other_folder.close(timeout=30)
    assert other_folder.run_id not in (None, run_id)

    restarted = MlflowTracker(killed.config, RUN_URI, "exp1")
    restarted.start(None, params())  # no run id: it restarts from step 0, or from a checkpoint taken too early
    for step in range(5, 15):
        restarted.log_metrics({"loss": 100.0 + step}, step)
    restarted.finish("FINISHED")
    restarted.close(timeout=30)
    assert restarted.run_id == run_id
    assert steps(client, run_id, "loss") == list(range(15))
    assert client.get_run(run_id).info.status == "FINISHED"

    again = MlflowTracker(killed.config, RUN_URI, "exp1")  # the finished run is not reopened
    again.start(None, {"a": 1})
    again.close(timeout=30)
    assert again.run_id not in (None, run_id, other_folder.run_id)
    experiment = client.get_experiment_by_name(killed.config.experiment).experiment_id
    assert len(client.search_runs([experiment])) == 3


def test_a_server_that_refuses_the_run_search_still_gets_a_new_run(mlflow_url: str, client: Any,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   warnings: Callable[[], list[str]]) -> None:
    """An older or stricter server answering the search with a 400 must not turn tracking off."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("filter not supported", error_code=INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(mlflow_tracking.MlflowClient, "search_runs", refuse)
    tracker = make_tracker(mlflow_url)
    tracker.start(None, {"a": 1})
    tracker.log_metrics({"loss": 1.0}, 3)
    tracker.close(timeout=30)
    assert tracker.run_id is not None
    assert steps(client, tracker.run_id, "loss") == [3]
    assert any("refused finding the run" in message for message in warnings())


def test_a_checkpoint_naming_a_run_the_server_lacks_gets_a_new_run(mlflow_url: str, client: Any,
                                                                   warnings: Callable[[], list[str]]) -> None:
    tracker = make_tracker(mlflow_url)
    tracker.start("0" * 32, {"a": 1})
    tracker.log_metrics({"loss": 1.0}, 5)
    tracker.close(timeout=30)
    assert tracker.run_id not in (None, "0" * 32)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["trainer.previous_run_id"] == "0" * 32 and run.data.params == {"a": "1"}
    assert steps(client, tracker.run_id, "loss") == [5]
    assert any("is not on" in message for message in warnings())


def test_a_server_that_is_not_there_costs_training_nothing(closed_url: str,
                                                           warnings: Callable[[], list[str]]) -> None:
    tracker = make_tracker(closed_url)
    began = time.perf_counter()
    tracker.start(None, params())
    for step in range(10_000):
        tracker.log_metrics({"loss": 0.5, "lr": 0.01}, step)
    tracker.set_tags({"a": "b"})
    tracker.log_artifact_bytes("plots/loss.png", b"png")
    tracker.finish("FAILED")
    assert time.perf_counter() - began < FAST
    began = time.perf_counter()
    tracker.close(timeout=1.0)
    assert time.perf_counter() - began < 1.0 + 2.0
    assert tracker.run_id is None
    assert tracker.counters.dropped_points == 10_000  # 20,000 points for a queue of 10,000
    messages = warnings()
    assert any("retrying in the background" in m for m in messages)
    assert any("10000 metric points dropped" in m for m in messages)
    assert sum("retrying" in m for m in messages) == 1  # once per kind of trouble, not once per attempt


def test_a_full_queue_drops_the_oldest_points_and_counts_them(closed_url: str) -> None:
    tracker = make_tracker(closed_url, max_points=100)
    tracker.start(None, {})
    for step in range(1000):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.counters.dropped_points == 900
    assert [p.step for p in tracker._points] == list(range(900, 1000))
    tracker.close(timeout=0.5)


def test_a_failing_server_gets_the_queued_points_once_it_recovers(mlflow_server: MlflowServer, client: Any,
                                                                 warnings: Callable[[], list[str]]) -> None:
    with FaultProxy(mlflow_server.host, mlflow_server.port or 0, FaultPlan(error_rate=1.0,
                                                                           error_statuses=(503,))) as proxy:
        tracker = make_tracker(proxy.url)
        tracker.start(None, {"a": 1})
        for step in range(10):
            tracker.log_metrics({"loss": float(step)}, step)
        wait_for(lambda: proxy.stats.errors >= 2)  # it retried, with a backoff
        assert tracker.run_id is None
        proxy.plan = FaultPlan()
        tracker.finish("FINISHED")
        tracker.close(timeout=30)  # closing shortens the backoff
    assert tracker.run_id is not None
    assert steps(client, tracker.run_id, "loss") == list(range(10))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert sum("retrying in the background" in m for m in warnings()) == 1


def test_a_slow_server_does_not_hold_up_close(mlflow_server: MlflowServer, warnings: Callable[[], list[str]]) -> None:
    with FaultProxy(mlflow_server.host, mlflow_server.port or 0, FaultPlan(latency_s=5.0)) as proxy:
        tracker = make_tracker(proxy.url)
        began = time.perf_counter()
        tracker.start(None, {"a": 1})
        for step in range(10_000):
            tracker.log_metrics({"loss": 0.5}, step)
        assert time.perf_counter() - began < FAST
        began = time.perf_counter()
        tracker.close(timeout=0.5)
        assert time.perf_counter() - began < 0.5 + 2.0
    assert any("gave up after 0.5 s" in m for m in warnings())


def test_the_server_stopping_mid_run_costs_training_nothing(mlflow_server: MlflowServer, client: Any,
                                                           warnings: Callable[[], list[str]]) -> None:
    """Last in this file: it leaves the server stopped (``mlflow_url`` starts it again for a later test)."""
    tracker = make_tracker(mlflow_server.ensure_running().url)
    tracker.start(None, {"a": 1})
    tracker.log_metrics({"loss": 0.0}, 0)
    wait_for(lambda: tracker.run_id is not None and steps(client, str(tracker.run_id), "loss") == [0])
    mlflow_server.stop()
    began = time.perf_counter()
    for step in range(1, 10_001):
        tracker.log_metrics({"loss": 0.5}, step)
    tracker.finish("FINISHED")
    assert time.perf_counter() - began < FAST
    began = time.perf_counter()
    tracker.close(timeout=1.0)
    assert time.perf_counter() - began < 1.0 + 2.0
    assert any("retrying in the background" in m for m in warnings())
