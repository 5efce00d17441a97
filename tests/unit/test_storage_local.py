"""The storage layer on local paths: same contract as S3 (atomic replace, listings, clear errors)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from trainer import storage


def test_write_read_stat_exists_delete(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.txt"
    storage.write_text(target, "héllo")  # parents are created
    assert storage.read_text(target) == "héllo"
    assert storage.stat(target).size == len("héllo".encode())
    assert storage.exists(target) and not storage.exists(tmp_path / "nope")
    storage.delete(target)
    storage.delete(target)
    assert not target.exists()


def test_file_uri_scheme_is_a_local_path(tmp_path: Path) -> None:
    storage.write_bytes(f"file://{tmp_path}/x.bin", b"1")
    assert (tmp_path / "x.bin").read_bytes() == b"1"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError), storage.open_write(target) as stream:
        stream.write(b"half of the new cont")
        raise ValueError("killed mid-write")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_concurrent_writers_never_mix_contents(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 3_000_000 for i in range(8)]
    threads = [threading.Thread(target=storage.write_bytes, args=(target, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_listing_is_sorted_recursive_or_one_level_and_hides_temp_files(tmp_path: Path) -> None:
    for rel in ("b/2.txt", "a.txt", "b/1.txt", "b/c/3.txt"):
        storage.write_bytes(tmp_path / rel, b"x")
    (tmp_path / f".a.txt{storage._TMP_MARKER}abc").write_bytes(b"partial")
    recursive = [Path(i.uri).relative_to(tmp_path).as_posix() for i in storage.list_objects(tmp_path)]
    assert recursive == ["a.txt", "b/1.txt", "b/2.txt", "b/c/3.txt"]
    level = [(Path(i.uri).name, i.is_dir) for i in storage.list_objects(tmp_path, recursive=False)]
    assert level == [("a.txt", False), ("b", True)]
    assert storage.delete_prefix(tmp_path / "b") == 3 and not (tmp_path / "b").exists()


def test_local_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(storage.NotFound, match="no such file") as info:
        storage.read_bytes(tmp_path / "missing.txt")
    assert str(tmp_path / "missing.txt") in str(info.value)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="is a file, not a directory"):
        storage.write_bytes(tmp_path / "afile" / "child.txt", b"x")
    with pytest.raises(storage.NotFound):
        list(storage.list_objects(tmp_path / "nodir"))


def test_copy_tree_local_to_local_with_unicode_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("图像 1.jpg", "sub/données.xml"):
        storage.write_bytes(src / name, name.encode())
    summary = storage.copy_tree(src, tmp_path / "dst")
    assert summary.objects == 2
    assert (tmp_path / "dst" / "sub" / "données.xml").read_bytes() == "sub/données.xml".encode()


def test_open_read_is_seekable_locally(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    storage.write_bytes(tmp_path / "r.bin", data)
    with storage.open_read(tmp_path / "r.bin") as stream:
        stream.seek(5000)
        assert stream.read(10) == data[5000:5010]


def test_a_bounded_read_of_a_file_without_a_size_stops_past_the_bound(tmp_path: Path) -> None:
    """read_bytes(max_bytes=N) of something whose size says nothing (a device, a file still growing) reads at
    most N + 1 bytes before refusing it; an empty file reads as empty."""
    with pytest.raises(storage.TooLarge) as info:
        storage.read_bytes("/dev/zero", max_bytes=100_000)
    assert (info.value.size, info.value.limit) == (100_001, 100_000)
    (tmp_path / "empty").write_bytes(b"")
    assert storage.read_bytes(tmp_path / "empty", max_bytes=0) == b""


def test_the_s3_client_key_follows_every_change_made_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key that picks the S3 client (endpoint, credentials, profile, retries) reads os.environ's own dict for
    speed: it must see what os.environ.get sees after each way tests and users change the environment."""
    from unittest import mock

    def values(key: tuple[object, ...]) -> list[object]:
        return [os.fsdecode(v) if isinstance(v, bytes) else v for v in key[1:]]

    def as_environ_says() -> list[str | None]:
        return [os.environ.get(name) for name in storage._CLIENT_ENV]

    seen = [values(storage._client_key())]
    assert seen[-1] == as_environ_says()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.9:1")
    monkeypatch.setenv("AWS_PROFILE", "é-profile")
    seen.append(values(storage._client_key()))
    assert seen[-1] == as_environ_says() and seen[-1] != seen[0]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # restored after the test, whatever happens below
    os.environ.update({"AWS_MAX_ATTEMPTS": "3"})
    os.environ.pop("AWS_PROFILE")
    seen.append(values(storage._client_key()))
    assert seen[-1] == as_environ_says() and seen[-1] != seen[1]
    with mock.patch.dict(os.environ, {"AWS_REGION": "eu-west-3"}, clear=True):
        assert values(storage._client_key()) == as_environ_says() == [
            "eu-west-3" if name == "AWS_REGION" else None for name in storage._CLIENT_ENV]
    assert values(storage._client_key()) == as_environ_says() == seen[-1]
    del os.environ["AWS_MAX_ATTEMPTS"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert values(storage._client_key()) == as_environ_says()
    assert storage._client_key()[0] == os.getpid()
