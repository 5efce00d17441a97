"""The pieces of MLflow tracking that need no server: params flattening, metric and key checks, which tracker
a rank gets, and the ``log.mlflow`` checks at start-up (tests/integration/test_tracking.py has a real server)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from trainer.config import Config, ConfigError, MlflowConfig, load_config
from trainer.tracking import (
    MAX_KEY_CHARS,
    MAX_PARAM_CHARS,
    MlflowTracker,
    NullTracker,
    artifact_path,
    flatten_params,
    metric_value,
    open_tracker,
    safe_key,
)

REPO = Path(__file__).resolve().parents[2]
DATA = ["data.train.coco=s3://b/train.json", "data.train.images=s3://b/images"]


def test_the_config_flattens_to_dotted_string_params() -> None:
    flat = flatten_params(Config().to_dict())
    assert flat["optim.lr"] == "0.02" and flat["data.train.coco"] == "" and flat["train.amp"] == "true"
    assert flat["log.mlflow.tracking_uri"] == "null" and flat["schedule.milestones"] == "[16, 22]"
    assert flat["model.options"] == "{}"  # an empty section stays visible
    assert all(isinstance(value, str) for value in flat.values())
    assert flatten_params({"a": {"b": {"c": 1}}, "d": "text"}) == {"a.b.c": "1", "d": "text"}
    assert flatten_params(flat) == flat  # already flat: unchanged


def test_params_respect_mlflows_limits() -> None:
    flat = flatten_params({"long": "x" * 10_000, "model": {"options": {"bad key!": 1, "../up": 2, "": 3}}})
    assert len(flat["long"]) == MAX_PARAM_CHARS and flat["long"].endswith("...(truncated)")
    assert flat["model.options.bad key_"] == "1"
    assert "model.options.._up" not in flat and all(".." not in PurePosixPath(k).parts for k in flat)
    assert safe_key("a" * 400) == "a" * MAX_KEY_CHARS
    assert safe_key("/abs") == "__abs" and safe_key("..") == "_.." and safe_key("") is None and safe_key(3) is None
    assert safe_key("loss_box_reg") == "loss_box_reg" and safe_key("eval/AP50") == "eval/AP50"


@pytest.mark.parametrize(("value", "expected"), [
    (0.5, 0.5), (3, 3.0), (float("nan"), None), (float("inf"), None), (True, None), ("0.5", None), (None, None),
])
def test_only_finite_numbers_are_metrics(value: Any, expected: float | None) -> None:
    assert metric_value(value) == expected


def test_numpy_numbers_are_metrics() -> None:
    numpy = pytest.importorskip("numpy")
    assert metric_value(numpy.float32(0.25)) == 0.25 and metric_value(numpy.int64(2)) == 2.0
    assert metric_value(numpy.float64("nan")) is None


def test_artifacts_stay_inside_the_run() -> None:
    assert artifact_path("plots/loss.png") == PurePosixPath("plots/loss.png")
    for bad in ("/etc/passwd", "../x.png", "plots/../../x", "", "plots/", "a\\b.png"):
        assert artifact_path(bad) is None, bad


def test_rank_zero_tracks_and_the_others_do_nothing() -> None:
    on = MlflowConfig(tracking_uri="http://127.0.0.1:1")
    assert isinstance(open_tracker(on, "runs/x", "x", rank=0), MlflowTracker)
    assert isinstance(open_tracker(on, "runs/x", "x", rank=1), NullTracker)
    assert isinstance(open_tracker(MlflowConfig(), "runs/x", "x", rank=0), NullTracker)
    null = NullTracker()
    null.start("abc", {"a": 1})
    null.log_metrics({"loss": 1.0}, 1)
    null.finish("FINISHED")
    null.close()
    assert null.run_id == "abc"  # a resumed job keeps the checkpoint's run id even with tracking off


def test_a_tracker_that_never_started_closes_at_once() -> None:
    tracker = MlflowTracker(MlflowConfig(tracking_uri="http://127.0.0.1:1"), "runs/x", "x")
    tracker.log_metrics({"loss": 1.0}, "3")  # type: ignore[arg-type]  # a bad step is refused, not raised
    tracker.finish("nonsense")
    tracker.close(timeout=0.1)
    assert tracker.run_id is None and tracker.run_name == "x"


def test_importing_the_tracker_imports_neither_mlflow_nor_torch() -> None:
    code = "import sys, trainer.tracking; sys.exit(1 if {'mlflow', 'torch'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


# ------------------------------------------------------------------------------------- log.mlflow checks
@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com/", "http://user@host:80",
                                 "./mlruns", "/data/mlruns", "file:///data/mlruns", "sqlite:///mlflow.db",
                                 "postgresql+psycopg2://u@db/mlflow", "databricks"])
def test_tracking_uris_mlflow_takes_are_accepted(uri: str) -> None:
    assert load_config(None, [*DATA, f"log.mlflow.tracking_uri={uri}"]).log.mlflow.tracking_uri == uri


@pytest.mark.parametrize(("override", "message"), [
    ("log.mlflow.tracking_uri=s3://bucket/mlruns", "log.mlflow.tracking_uri: unsupported scheme 's3'"),
    ("log.mlflow.tracking_uri=http://", "log.mlflow.tracking_uri: needs a host"),
    ("log.mlflow.tracking_uri=''", "log.mlflow.tracking_uri: must be a tracking URI"),
    ("log.mlflow.tracking_uri='http://a b'", "log.mlflow.tracking_uri: must be a tracking URI"),
    ("log.mlflow.experiment=''", "log.mlflow.experiment: must be a name of 1 to 500 characters"),
    ("log.mlflow.experiment=" + "x" * 501, "log.mlflow.experiment: must be a name of 1 to 500 characters"),
    ("log.mlflow.run_name=' '", "log.mlflow.run_name: must be null (run.name) or a name"),
])
def test_log_mlflow_mistakes_stop_the_run_with_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tracking_without_the_client_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, "log.mlflow.tracking_uri=http://127.0.0.1:5000"])
    assert str(info.value).endswith("log.mlflow.tracking_uri: MLflow tracking needs the mlflow client: "
                                    "pip install 'detection-trainer[mlflow]'")
    assert load_config(None, DATA).log.mlflow.tracking_uri is None  # tracking off looks nothing up
    # `trainer predict` reads a run's config for its model section only: it tracks nothing
    load_config(None, ["log.mlflow.tracking_uri=http://127.0.0.1:5000"], require_data=False)


def test_no_module_imports_mlflow_at_load_time() -> None:
    """mlflow comes with the ``mlflow`` extra: only the tracker's thread imports it, when tracking is on."""
    from tests.unit.test_layering import MODULES, import_chain

    chains = [" -> ".join(chain) for module in MODULES if (chain := import_chain(module, {"mlflow"}))]
    assert not chains, chains


@pytest.mark.parametrize("uri", ["https://alice:s3cret-pw@mlflow.example.com", "postgresql://u:s3cret-pw@db/mlflow"])
def test_a_password_in_the_tracking_uri_is_refused_and_never_repeated(uri: str) -> None:
    """The config is printed, saved as config.yaml and logged as params: a password there would leak everywhere."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, f"log.mlflow.tracking_uri={uri}"])
    message = str(info.value)
    assert "log.mlflow.tracking_uri: must not carry a password" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "s3cret-pw" not in message
