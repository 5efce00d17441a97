"""Permanent S3 errors become one clear StorageError naming the URI and the cause (and no traceback at the CLI).

Access and credential errors come from a second moto server with IAM authentication switched on, so the
403s, their error codes and HEAD's body-less answers are the server's own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.conftest import REPO, S3Env
from trainer import storage
from trainer.local_s3 import LocalS3Server, free_port


@pytest.fixture(scope="module")
def auth_server() -> Iterator[dict[str, Any]]:
    """An IAM-enforcing server with bucket 'locked', one object, and a user who has no permissions."""
    # The first 4 requests are allowed without authentication: enough to set the scene.
    with LocalS3Server("127.0.0.1", server_env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as server:
        admin = {"endpoint_url": server.endpoint_url, "region_name": "us-east-1",
                 "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        boto3.client("s3", **admin).put_object(Bucket="locked", Key="data/x.bin", Body=b"x")
        yield {"endpoint": server.endpoint_url, "key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def _use(monkeypatch: pytest.MonkeyPatch, endpoint: str, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainer: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_bucket_is_named_for_every_operation(s3: S3Env) -> None:
    uri = "s3://no-such-bucket-here/k.txt"
    for operation in (storage.read_bytes, storage.stat, storage.exists, storage.open_read,
                      lambda u: list(storage.list_objects(u)), lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(storage.BucketNotFound, match="bucket 'no-such-bucket-here' does not exist"):
            operation(uri)
    _assert_one_line_error(_cli("ls", "s3://no-such-bucket-here/"), "no-such-bucket-here", "does not exist")


def test_missing_object_is_not_found_and_names_it(s3: S3Env) -> None:
    with pytest.raises(storage.NotFound, match="no such object") as info:
        storage.read_bytes(s3.uri("absent.txt"))
    assert info.value.uri == s3.uri("absent.txt")
    with pytest.raises(storage.NotFound):
        storage.open_read(s3.uri("absent.txt"))
    _assert_one_line_error(_cli("cp", s3.uri("absent.txt"), "out.txt"), s3.uri("absent.txt"), "no such")


def test_access_denied_for_a_user_without_permissions(auth_server: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, auth_server["endpoint"], auth_server["key_id"], auth_server["secret"])
    for operation in (storage.read_bytes, storage.stat, lambda u: storage.write_bytes(u, b"y")):
        with pytest.raises(storage.AccessDenied, match="access denied"):
            operation("s3://locked/data/x.bin")
    _assert_one_line_error(_cli("ls", "s3://locked/data/"), "s3://locked/data/", "access denied")


def test_unknown_access_key_and_wrong_secret_are_credential_errors(auth_server: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, auth_server["endpoint"], "AKIAUNKNOWNKEY000000", "whatever")
    with pytest.raises(storage.CredentialsError, match="access key is not recognised"):
        storage.stat("s3://locked/data/x.bin")  # a HEAD: the cause comes from a follow-up probe
    _use(monkeypatch, auth_server["endpoint"], auth_server["key_id"], "wrong-secret")
    with pytest.raises(storage.CredentialsError, match="wrong secret key"):
        storage.read_bytes("s3://locked/data/x.bin")
    _assert_one_line_error(_cli("cp", "s3://locked/data/x.bin", "x.bin"), "wrong secret key")


def test_no_credentials_at_all(s3: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.CredentialsError, match="no usable AWS credentials"):
        storage.read_bytes(s3.uri("k"))
    _assert_one_line_error(_cli("ls", s3.uri()), "no usable AWS credentials")


def test_unreachable_endpoint_fails_after_bounded_retries(s3: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(storage.EndpointUnreachable, match=f"cannot reach the S3 endpoint {closed}"):
        storage.read_bytes("s3://bucket/key")
    assert time.monotonic() - started < 30
    _assert_one_line_error(_cli("ls", "s3://bucket/"), closed)


def test_malformed_uris_are_rejected_clearly() -> None:
    for bad in ("s3://", "s3:///key", "gs://bucket/key", "http://example.invalid/x"):
        with pytest.raises(storage.StorageError):
            storage.parse(bad)
    _assert_one_line_error(_cli("ls", "gs://bucket/key"), "unsupported URI scheme")
