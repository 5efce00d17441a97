"""URI parsing/joining and the logging foundation."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from trainer import storage
from trainer.logs import setup_logging


def test_parse_s3_and_local() -> None:
    assert storage.parse("s3://bkt/a/b.jpg") == storage.S3Location("bkt", "a/b.jpg")
    assert storage.parse("S3://bkt") == storage.S3Location("bkt", "")
    assert storage.parse("relative/dir") == Path("relative/dir")
    assert str(storage.S3Location("b", "k/x")) == "s3://b/k/x"


@pytest.mark.parametrize("bad", ["", "s3://", "s3:///k", "s3:// b/k", "gs://b/k", "https://h/x", "s3://b\tx/k",
                                 "s3://b\u2003x/k", "s3://b\xa0/k", "s3://b\u2028/k", "s3://../k", "s3://./k"])
def test_parse_rejects_what_it_cannot_serve(bad: str) -> None:
    with pytest.raises(storage.StorageError) as info:
        storage.parse(bad)
    assert str(info.value).startswith(f"{bad}: ")


def test_join_and_basename() -> None:
    assert storage.join("s3://b/runs/", "x", "/y.json") == "s3://b/runs/x/y.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("s3://b/", "k") == "s3://b/k"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.basename("s3://b/dir/f.txt") == "f.txt"
    assert storage.basename("/x/y/z.bin") == "z.bin"


def _log_line(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], level: str = "INFO") -> str:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = io.StringIO()
    setup_logging(level, stream=stream)
    logging.getLogger("trainer.test").info("step %d", 7)
    logging.getLogger("botocore.test").info("library chatter")
    return stream.getvalue()


def test_log_lines_carry_the_rank_only_in_multi_process_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    multi = _log_line(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2"})
    assert "INFO  [rank 1] step 7" in multi
    assert "library chatter" not in multi
    single = _log_line(monkeypatch, {})
    assert "[rank" not in single and "step 7" in single
    assert _log_line(monkeypatch, {}, level="warning") == ""


def test_unknown_log_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup_logging("loud")


def test_the_fast_client_is_given_only_keys_it_spells_exactly() -> None:
    """A key with a leading or trailing slash, an empty segment or a "." / ".." segment goes to boto3 (object_store
    would read another object or refuse it): every key of one to six characters over "a", ".", "/"."""
    from itertools import product

    from trainer import s3_fast

    for n in range(1, 7):
        for key in map("".join, product("a./", repeat=n)):
            exact = not any(segment in ("", ".", "..") for segment in key.split("/"))
            assert s3_fast.spells_exactly(key) == exact, key
