"""Shared fixtures: a real S3-compatible server (moto) on loopback, fresh buckets, the fault proxy, and a real
MLflow tracking server on loopback.

Before anything runs, the AWS environment is pinned to loopback: no profile, no shared config, no instance
metadata look-ups, and a default endpoint on a closed local port, so a test that forgets a fixture fails
locally instead of sending anything off this machine. MLflow settings from outside are dropped and its usage
telemetry is turned off, for this process and every subprocess it starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.fault_proxy import FaultPlan, FaultProxy
from tests.support.mlflow_server import MlflowServer
from trainer.local_s3 import LocalS3Server, free_port

REPO = Path(__file__).resolve().parent.parent
BCCD = REPO / "examples" / "data" / "bccd"
SYSTEM_TEMP = Path(tempfile.gettempdir())  # before the session moves TMPDIR under pytest's (owner-only) base temp


def _pin_aws_env_to_loopback() -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update({
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # closed: nothing listens there
        "AWS_REGION": "us-east-1",
    })


_pin_aws_env_to_loopback()


def _pin_mlflow_env() -> None:
    """No tracking server, token or registry from the developer's shell; no MLflow usage reports (MLflow 3
    sends them by default from clients and servers; either variable turns them off)."""
    for name in list(os.environ):
        if name.startswith("MLFLOW_"):
            del os.environ[name]
    os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})


_pin_mlflow_env()


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytests_base_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What the processes the suite starts leave in the temp folder (torch elastic's torchelastic_* log folders,
    multiprocessing's pymp-* folders: about 800 a run) goes under pytest's base temp, which pytest prunes, instead
    of piling up in /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        patch.setattr(tempfile, "tempdir", None)  # this process, too, picks the new folder on its next temp file
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    with LocalS3Server("127.0.0.1") as server:
        yield server


@dataclass
class S3Env:
    server: LocalS3Server
    bucket: str
    client: Any

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


def _new_bucket(client: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    """AWS variables pointing at the local server, and a fresh empty bucket."""
    for name, value in s3_server.client_env().items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    return S3Env(s3_server, _new_bucket(client), client)


@pytest.fixture
def fault_proxy(s3: S3Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server; the storage layer's endpoint points at it.

    The plan starts clean; each test sets ``fault_proxy.plan`` to the faults it wants.
    """
    with FaultProxy(s3.server.host, s3.server.port or 0, FaultPlan()) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


_EARLY_MLFLOW: list[MlflowServer] = []  # launched at collection when a collected test will need it


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Move the modules with ``slow`` tests to the front, each module's tests kept together and in order.

    ``make test`` hands whole modules to two xdist workers in this order (``--dist loadfile
    --no-loadscope-reorder``): the long ones start early and the short ones fill the end, instead of one long
    module running alone after the rest.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within each group is kept


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long modules first (see ``_slow_modules_first``). Start the MLflow server's process as soon as the tests
    are collected, when one of them needs it: its start-up (tens of seconds of imports) then overlaps the tests
    before it instead of adding to them."""
    _slow_modules_first(items)
    if any({"mlflow_server", "mlflow_url"} & set(getattr(item, "fixturenames", ())) for item in items):
        _EARLY_MLFLOW.append(MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-server-"))).launch())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _EARLY_MLFLOW:  # also when no test used it (deselected, or the run was interrupted)
        server = _EARLY_MLFLOW.pop()
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite, proxied artifacts), shared by the session: its start costs
    tens of seconds, so it is launched at collection. A test may stop it; use ``mlflow_url`` to have it running
    again."""
    if _EARLY_MLFLOW:
        yield _EARLY_MLFLOW[0].start()
        return
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def mlflow_url(mlflow_server: MlflowServer) -> str:
    """The running server's address (restarted, on the same port with the same data, if a test stopped it)."""
    return mlflow_server.ensure_running().url
