"""The storage layer keeps data correct through throttling, server errors and connections cut mid-body.

Faults come from the fault proxy between the client and the real S3 server; each test checks the proxy did
inject them, so a quiet proxy cannot make a test pass.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import S3Env
from tests.support.fault_proxy import FaultPlan, FaultProxy
from trainer import storage

MB = 1024 * 1024


def test_ten_percent_503_and_500_answers_do_not_corrupt_or_fail(s3: S3Env, fault_proxy: FaultProxy,
                                                                tmp_path: Path) -> None:
    fault_proxy.plan = FaultPlan(error_rate=0.10, error_statuses=(503, 500), seed=1)
    blobs = {f"small/{i:03d}.bin": os.urandom(1000 + i) for i in range(150)}
    src = tmp_path / "src"
    for key, data in blobs.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)

    storage.copy_tree(src, s3.uri())
    listed = {storage.parse(i.uri).key for i in storage.list_objects(s3.uri("small"))}  # type: ignore[union-attr]
    assert listed == set(blobs)
    for key, data in blobs.items():
        assert storage.read_bytes(s3.uri(key)) == data
    storage.copy_tree(s3.uri("small"), tmp_path / "back")
    for key, data in blobs.items():
        assert (tmp_path / "back" / key.removeprefix("small/")).read_bytes() == data

    big = os.urandom(40 * MB)
    storage.write_bytes(s3.uri("big.bin"), big)  # multipart: parts retried independently
    assert hashlib.sha256(storage.read_bytes(s3.uri("big.bin"))).digest() == hashlib.sha256(big).digest()

    assert fault_proxy.stats.errors >= 30, fault_proxy.stats
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_bodies_cut_mid_stream_are_resumed_with_correct_bytes(s3: S3Env, fault_proxy: FaultProxy,
                                                              tmp_path: Path) -> None:
    data = os.urandom(30 * MB)
    storage.write_bytes(s3.uri("obj.bin"), data)
    small = {f"s/{i}": os.urandom(200_000) for i in range(40)}
    for key, blob in small.items():
        storage.write_bytes(s3.uri(key), blob)

    fault_proxy.plan = FaultPlan(cut_rate=0.3, cut_after_bytes=64 * 1024, methods=("GET",), seed=2)
    digest = hashlib.sha256(data).digest()
    assert hashlib.sha256(storage.read_bytes(s3.uri("obj.bin"))).digest() == digest
    with storage.open_read(s3.uri("obj.bin")) as stream:
        assert hashlib.sha256(stream.read()).digest() == digest
    storage.download_file(s3.uri("obj.bin"), tmp_path / "obj.bin")  # multipart ranged download
    assert hashlib.sha256((tmp_path / "obj.bin").read_bytes()).digest() == digest

    storage.copy_tree(s3.uri("s"), tmp_path / "s")
    for key, blob in small.items():
        assert (tmp_path / key).read_bytes() == blob
    assert fault_proxy.stats.cuts >= 10, fault_proxy.stats


def test_every_request_failing_gives_up_with_a_clear_error_and_keeps_old_data(
        s3: S3Env, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.write_bytes(s3.uri("stable.bin"), b"v1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    fault_proxy.plan = FaultPlan(error_rate=1.0, error_statuses=(503,), methods=("PUT",))  # parts fail
    with pytest.raises(storage.StorageError, match=r"s3://.*/stable.bin: S3 error SlowDown"):
        storage.write_bytes(s3.uri("stable.bin"), os.urandom(20 * MB))
    fault_proxy.plan = FaultPlan()
    assert storage.read_bytes(s3.uri("stable.bin")) == b"v1"
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_a_body_cut_on_every_attempt_ends_in_a_storage_error(s3: S3Env, fault_proxy: FaultProxy) -> None:
    storage.write_bytes(s3.uri("obj.bin"), os.urandom(MB))
    fault_proxy.plan = FaultPlan(cut_rate=1.0, cut_after_bytes=1000, methods=("GET",))
    with pytest.raises(storage.StorageError, match="kept failing after retries"):
        storage.read_bytes(s3.uri("obj.bin"))
    assert fault_proxy.stats.cuts == storage.STREAM_ATTEMPTS
