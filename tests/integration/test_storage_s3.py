"""The storage layer against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import BCCD, S3Env
from trainer import storage

MB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_text_stat_exists_delete_roundtrip(s3: S3Env) -> None:
    uri = s3.uri("a/b/c.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello wörld")
    assert storage.read_text(uri) == "hello wörld"
    info = storage.stat(uri)
    assert info.size == len("hello wörld".encode())
    assert storage.exists(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is gone is not an error


def test_pagination_lists_every_key_past_1000(s3: S3Env, tmp_path: Path) -> None:
    pairs = []
    for i in range(1234):
        path = tmp_path / f"f{i:05d}"
        path.write_bytes(str(i).encode())
        pairs.append((str(path), s3.uri(f"many/{i % 3}/f{i:05d}")))
    assert storage.copy_many(pairs).objects == 1234

    listed = list(storage.list_objects(s3.uri("many")))
    assert len(listed) == 1234
    keys = [info.uri for info in listed]
    assert keys == sorted(keys)
    assert {info.size for info in listed} <= {1, 2, 3, 4}

    top = list(storage.list_objects(s3.uri("many/"), recursive=False))
    assert [(t.uri, t.is_dir) for t in top] == [(s3.uri(f"many/{d}/"), True) for d in range(3)]

    assert storage.delete_prefix(s3.uri("many")) == 1234  # more than one DeleteObjects batch
    assert list(storage.list_objects(s3.uri("many"))) == []


def test_multipart_object_of_60_mb_round_trips_through_every_path(s3: S3Env, tmp_path: Path) -> None:
    data = os.urandom(60 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = s3.uri("big/data.bin")

    storage.upload_file(src, uri)
    etag = s3.client.head_object(Bucket=s3.bucket, Key="big/data.bin")["ETag"]
    assert "-" in etag, "a 60 MB upload should be multipart"

    assert sha(storage.read_bytes(uri)) == sha(data)
    out = tmp_path / "out" / "copy.bin"
    storage.download_file(uri, out)
    assert sha(out.read_bytes()) == sha(data)

    storage.copy(uri, s3.uri("big/copy.bin"))  # S3 → S3, managed multipart copy
    assert sha(storage.read_bytes(s3.uri("big/copy.bin"))) == sha(data)

    with storage.open_read(uri) as stream:
        for offset in (0, 17 * MB + 3, 60 * MB - 10):
            stream.seek(offset)
            assert stream.read(4096) == data[offset : offset + 4096]


def test_open_write_streams_a_large_object_and_commits_on_close(s3: S3Env) -> None:
    uri = s3.uri("stream/out.bin")
    chunk = os.urandom(MB)
    with storage.open_write(uri) as stream:
        for _ in range(20):
            stream.write(chunk)
    assert storage.stat(uri).size == 20 * MB
    assert storage.read_bytes(uri) == chunk * 20


@pytest.mark.parametrize("size", [64 * 1024, 20 * MB], ids=["single-put", "multipart"])
def test_concurrent_writers_leave_exactly_one_complete_version(s3: S3Env, size: int) -> None:
    uri = s3.uri("contended/object")
    payloads = [bytes([i]) * size for i in range(6)]
    barrier = threading.Barrier(len(payloads))
    errors: list[BaseException] = []

    def writer(payload: bytes) -> None:
        try:
            barrier.wait()
            storage.write_bytes(uri, payload)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert storage.read_bytes(uri) in payloads
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert uploads == []


def test_failed_streaming_write_keeps_the_previous_object(s3: S3Env) -> None:
    uri = s3.uri("keep/me.bin")
    storage.write_bytes(uri, b"old content")
    with pytest.raises(RuntimeError, match="producer failed"), storage.open_write(uri) as stream:
        stream.write(os.urandom(20 * MB))
        raise RuntimeError("producer failed")
    assert storage.read_bytes(uri) == b"old content"


def test_unicode_and_awkward_keys_survive_listing_and_copies(s3: S3Env, tmp_path: Path) -> None:
    names = ["données/图像 1.jpg", "with space+plus&amp.txt", "emoji-🙂/ok.bin", "percent%20literal.txt"]
    for name in names:
        storage.write_bytes(s3.uri(f"u/{name}"), name.encode())
    listed = sorted(storage.parse(i.uri).key for i in storage.list_objects(s3.uri("u")))  # type: ignore[union-attr]
    assert listed == sorted(f"u/{n}" for n in names)

    local = tmp_path / "local"
    storage.copy_tree(s3.uri("u"), local)
    for name in names:
        assert (local / name).read_bytes() == name.encode()
    storage.copy_tree(local, s3.uri("back"))
    for name in names:
        assert storage.read_bytes(s3.uri(f"back/{name}")) == name.encode()


def test_tree_copies_between_local_and_s3_are_identical(s3: S3Env, tmp_path: Path) -> None:
    up = storage.copy_tree(BCCD / "Annotations", s3.uri("bccd/Annotations"))
    files = sorted((BCCD / "Annotations").iterdir())
    assert up.objects == len(files) and up.bytes == sum(f.stat().st_size for f in files)
    storage.copy_tree(s3.uri("bccd"), s3.uri("mirror"))  # S3 → S3
    down = storage.copy_tree(s3.uri("mirror/Annotations"), tmp_path / "ann")
    assert down.objects == len(files)
    for f in files:
        assert (tmp_path / "ann" / f.name).read_bytes() == f.read_bytes()


def test_keys_that_would_escape_a_local_destination_are_refused(s3: S3Env, tmp_path: Path) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="evil/../../outside.txt", Body=b"x")
    s3.client.put_object(Bucket=s3.bucket, Key="evil/folder/", Body=b"")  # console folder marker: skipped
    dest = tmp_path / "dest"
    with pytest.raises(storage.StorageError, match="leave the destination"):
        storage.copy_tree(s3.uri("evil"), dest)
    assert not (tmp_path / "outside.txt").exists()
    assert not dest.exists()


def test_listing_one_object_by_its_full_key(s3: S3Env) -> None:
    storage.write_bytes(s3.uri("one/file.txt"), b"1")
    assert [i.uri for i in storage.list_objects(s3.uri("one/file.txt"))] == [s3.uri("one/file.txt")]
    assert list(storage.list_objects(s3.uri("one/fil"))) == []
