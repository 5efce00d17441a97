"""The fast read client (obstore, trainer/s3_fast.py) against the same moto server: the same bytes and the same
one-line errors as boto3 (TRAINER_S3_CLIENT=boto3), boto3's credentials chain reaching it, and fork safety.

The existing storage, fault-proxy and error tests cover the read semantics; run them with TRAINER_S3_CLIENT=obstore
to put every read of theirs on the fast client.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.credentials
import pytest

from tests.conftest import REPO, S3Env
from tests.support.voc import make_voc, voc_xml
from trainer import s3_fast, storage

MB = 1024 * 1024


def _reads_everything(s3: S3Env, big: bytes) -> dict[str, object]:
    out: dict[str, object] = {"small": storage.read_bytes(s3.uri("small.bin")),
                              "big": storage.read_bytes(s3.uri("big.bin"), size_hint=len(big))}
    with storage.open_read(s3.uri("big.bin"), buffer_size=64 * 1024) as stream:
        stream.seek(17 * MB + 5)
        out["seek"] = stream.read(100_000)
    for name, uri in (("missing key", s3.uri("absent.bin")), ("missing bucket", "s3://no-such-bucket-fast/x")):
        for reader in (storage.read_bytes, storage.open_read):
            with pytest.raises(storage.StorageError) as info:
                reader(uri)
            out[f"{name} {reader.__name__}"] = (type(info.value).__name__, str(info.value))
    return out


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_both_clients_read_the_same_bytes_and_raise_the_same_errors(s3: S3Env,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    big = os.urandom(40 * MB + 123)  # three ranged parts for the size_hint path
    storage.write_bytes(s3.uri("big.bin"), big)
    storage.write_bytes(s3.uri("small.bin"), b"s" * 100_000)
    results = {}
    for client in ("obstore", "boto3"):
        monkeypatch.setenv("TRAINER_S3_CLIENT", client)
        before = s3_fast.requests
        results[client] = _reads_everything(s3, big)
        assert (s3_fast.requests > before) == (client == "obstore"), client
    assert results["obstore"] == results["boto3"]
    assert results["obstore"]["big"] == big and results["obstore"]["seek"] == big[17 * MB + 5 : 17 * MB + 100_005]
    assert results["obstore"]["missing bucket read_bytes"][0] == "BucketNotFound"
    assert results["obstore"]["missing key read_bytes"][0] == "NotFound"


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_a_bounded_read_refuses_a_larger_file_or_object_by_its_size(s3: S3Env, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     client: str) -> None:
    """read_bytes(max_bytes=N), the bound on untrusted inputs read whole: a file or object over N is refused with
    TooLarge naming its size (from the file system or the GET's headers, before the body is read); one of N bytes
    reads whole, through either client."""
    monkeypatch.setenv("TRAINER_S3_CLIENT", client)
    data = os.urandom(3 * MB + 7)
    storage.write_bytes(s3.uri("x.bin"), data)
    (tmp_path / "x.bin").write_bytes(data)
    before = s3_fast.requests
    for uri in (s3.uri("x.bin"), str(tmp_path / "x.bin")):
        assert storage.read_bytes(uri, max_bytes=len(data)) == data
        with pytest.raises(storage.TooLarge) as info:
            storage.read_bytes(uri, max_bytes=len(data) - 1)
        assert (info.value.size, info.value.limit) == (len(data), len(data) - 1)
        assert str(info.value) == f"{uri}: {len(data)} bytes, more than the {len(data) - 1} this read allows"
    large = os.urandom(storage.MULTIPART_THRESHOLD + 5)  # the ranged (or transfer manager's) path of a size hint
    storage.write_bytes(s3.uri("large.bin"), large)
    assert storage.read_bytes(s3.uri("large.bin"), size_hint=len(large), max_bytes=len(large)) == large
    with pytest.raises(storage.TooLarge, match=f"{len(large)} bytes, more than the {len(large) - 1}"):
        storage.read_bytes(s3.uri("large.bin"), size_hint=len(large) - 1, max_bytes=len(large) - 1)
    assert (s3_fast.requests > before) == (client == "obstore")


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_an_object_replaced_during_a_read_is_an_error_not_a_mix(s3: S3Env, monkeypatch: pytest.MonkeyPatch,
                                                                client: str) -> None:
    monkeypatch.setenv("TRAINER_S3_CLIENT", client)
    storage.write_bytes(s3.uri("v.bin"), b"1" * MB)
    with storage.open_read(s3.uri("v.bin"), buffer_size=4096) as stream:
        assert stream.read(10) == b"1" * 10
        storage.write_bytes(s3.uri("v.bin"), b"2" * MB)
        stream.seek(MB // 2)  # a new ranged GET, pinned to the first version's ETag
        with pytest.raises(storage.StorageError, match="changed while it was being read"):
            stream.read(10)


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_credentials_from_a_profile_reach_the_fast_client(s3: S3Env, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    storage.write_bytes(s3.uri("p.bin"), b"profile")
    env = s3.server.client_env()
    (tmp_path / "credentials").write_text(f"[reader]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}-p\n"
                                          f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "reader")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("TRAINER_S3_CLIENT", "obstore")
    before = s3_fast.requests
    assert storage.read_bytes(s3.uri("p.bin")) == b"profile"
    assert s3_fast.requests > before
    # the store's key holds the AWS environment as os.environ stores it: encoded
    store = next(v for k, v in s3_fast._stores.items() if k[0] == os.getpid() and b"reader" in k and k[-1] == s3.bucket)
    assert store.credential_provider()["access_key_id"] == env["AWS_ACCESS_KEY_ID"] + "-p"


def test_refreshable_credentials_are_refreshed_through_botocore() -> None:
    calls = []

    def refresh() -> dict[str, str]:
        calls.append(1)
        expiry = datetime.now(UTC) + timedelta(hours=1)
        return {"access_key": f"key-{len(calls)}", "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    soon = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()  # inside botocore's refresh window
    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(
        {"access_key": "key-0", "secret_key": "s", "token": "t", "expiry_time": soon}, refresh, "test")
    answer = s3_fast._credential_provider(creds)()
    assert calls and answer["access_key_id"] == "key-1" and answer["token"] == "t"
    assert answer["expires_at"] is not None and answer["expires_at"] <= datetime.now(UTC) + timedelta(minutes=10)
    static = s3_fast._credential_provider(botocore.credentials.Credentials("a", "b"))()
    assert static["expires_at"] is None


def _run_script(script: str, bucket: str, timeout: float, env: dict[str, str] | None = None,
                extra_args: list[str] | None = None) -> dict[str, str]:
    """Run ``script`` in a fresh interpreter (TRAINER_S3_CLIENT=auto, plus ``env``); its "name value" output
    lines, by name."""
    full_env = {**os.environ, "TRAINER_S3_CLIENT": "auto"}
    full_env.pop("TOKIO_WORKER_THREADS", None)  # only a test's own env sets it
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-c", script, bucket, *(extra_args or [])], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


_FORK_SCRIPT = """
import multiprocessing, os, sys
from trainer import s3_fast, storage
uris = [f"s3://{sys.argv[1]}/f/{i}" for i in range(40)]
for uri in uris:
    storage.write_bytes(uri, uri.encode())

def child(queue):
    data = [storage.read_bytes(u) for u in uris[:20]]
    queue.put((data == [u.encode() for u in uris[:20]], s3_fast.requests))

def in_child():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    result = queue.get(timeout=60)
    proc.join(timeout=60)
    return result

first = [storage.read_bytes(u) for u in uris[:3]]       # a few reads: boto3, the runtime is not started
print("parent-before", s3_fast.requests)
print("child-1", *in_child())                           # a forked reader switches to obstore after 15 reads
[storage.read_bytes(u) for u in uris]                   # the parent itself now reads through obstore
print("parent-after", s3_fast.requests > 0)
print("child-2", *in_child())                           # runtime inherited: boto3, and no hang
"""


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_forked_readers_use_the_fast_client_only_where_it_can_run(s3: S3Env) -> None:
    lines = _run_script(_FORK_SCRIPT, s3.bucket, timeout=120)
    assert lines["parent-before"] == "0"
    assert lines["child-1"] == f"True {20 - s3_fast.FAST_AFTER_READS + 1}"
    assert lines["parent-after"] == "True"
    assert lines["child-2"] == "True 0"


_LOADER_SCRIPT = """
import os, sys
import torch
from torch.utils.data import DataLoader, Dataset
from trainer import s3_fast, storage
s3_fast.RUNTIME_THREADS = int(os.environ.get("TEST_RUNTIME_THREADS", s3_fast.RUNTIME_THREADS))
uris = [f"s3://{sys.argv[1]}/w/{i}" for i in range(8)]
for uri in uris:
    storage.write_bytes(uri, uri.encode())
storage.read_bytes(uris[0])  # the training process reads through boto3 (it forks workers)
inherited = storage._client_and_session(storage._client_key())[1]._session.get_component("data_loader")
for region in ("eu-west-1", "us-east-1"):  # more sessions in this process: boto3's data path is listed once
    os.environ["AWS_REGION"] = region
    storage.s3_client()
print("search-paths-unique", len(set(inherited.search_paths)) == len(inherited.search_paths))

class Reads(Dataset):
    def __len__(self):
        return len(uris)

    def __getitem__(self, i):
        data = storage.read_bytes(uris[i])
        session = storage._client_and_session(storage._client_key())[1]
        shared = session._session.get_component("data_loader") is inherited
        tasks = "/proc/self/task"
        runtime = sum(open(f"{tasks}/{t}/comm").read().startswith("tokio") for t in os.listdir(tasks))
        return data == uris[i].encode(), s3_fast.requests, shared, os.getpid(), runtime

rows = list(DataLoader(Reads(), batch_size=None, num_workers=1))
print("parent-requests", s3_fast.requests)
print("worker-rows", *[f"{ok}/{requests}/{shared}" for ok, requests, shared, _, _ in rows])
print("worker-pid-differs", rows[0][3] != os.getpid())
print("worker-runtime-threads", max(row[4] for row in rows))
"""


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_a_dataloader_worker_reads_through_the_fast_client_from_its_first_read(s3: S3Env) -> None:
    """A loader worker never forks, so it need not spend its first reads on boto3; and its first client reuses the
    parsed service models of the process it was forked from (botocore's data loader) instead of 0.4 s of JSON."""
    lines = _run_script(_LOADER_SCRIPT, s3.bucket, timeout=180)
    assert lines["search-paths-unique"] == "True"
    assert lines["parent-requests"] == "0"
    assert lines["worker-rows"] == " ".join(f"True/{n}/True" for n in range(1, 9))
    assert lines["worker-pid-differs"] == "True"
    # obstore's runtime in a worker has RUNTIME_THREADS threads, not one per core (a cap of 1 tells the two apart
    # on a 2-core machine); a user's TOKIO_WORKER_THREADS still wins
    assert lines["worker-runtime-threads"] == str(s3_fast.RUNTIME_THREADS)
    capped = _run_script(_LOADER_SCRIPT, s3.bucket, timeout=180, env={"TEST_RUNTIME_THREADS": "1"})
    assert capped["worker-runtime-threads"] == "1"
    chosen = _run_script(_LOADER_SCRIPT, s3.bucket, timeout=180, env={"TOKIO_WORKER_THREADS": "3"})
    assert chosen["worker-runtime-threads"] == "3"


@pytest.mark.parametrize(("endpoint", "style", "expected"), [
    ("http://minio.local:9000", "path", ("http://minio.local:9000", False)),
    ("http://minio.local:9000", "virtual", ("http://data.minio.local:9000", True)),
    (None, "auto", (None, True)),  # AWS: obstore builds the regional endpoint itself
    (None, "path", (None, False)),
    ("http://127.0.0.1:9000", "auto", ("http://127.0.0.1:9000", False)),
])
def test_the_fast_client_addresses_buckets_as_boto3_does(endpoint: str | None, style: str,
                                                         expected: tuple[str | None, bool],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.config import Config

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-west-2", aws_access_key_id="a",
                          aws_secret_access_key="b", config=Config(s3={"addressing_style": style}))
    assert s3_fast._where(client, "data") == expected


def _listing(uri: str, recursive: bool = False) -> list[tuple[str, int, bool, str | None]]:
    return [(info.uri, info.size, info.is_dir, info.etag) for info in storage.list_objects(uri, recursive=recursive)]


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_one_level_listings_are_the_same_through_both_clients(s3: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's listing through obstore (two keys per image for the converter) names every object and sub-folder
    exactly as boto3 does: awkward characters, the folder's own marker object, sub-folder markers, more than one
    page. Keys obstore cannot spell ("." and ".." segments, empty segments, control characters) fall back to boto3
    for that listing only; the bucket's reads stay on the fast client."""
    plain = ["z/", "z/a b.xml", "z/x%20y.xml", "z/\u00fc.xml", "z/#h+q?.xml", "z/back\\slash.xml", "z/..x",
             "z/sub/", "z/sub/e.xml", "z/other/f", "top.xml"]
    awkward = ["bad/./c", "bad/a//b", "bad/tab\t.xml", "bad/ok.xml", "dots/../d", "dots/ok.xml"]
    for key in plain + awkward:
        storage.write_bytes(s3.uri(key), key.encode())
    storage.copy_many([(str(REPO / "README.md"), s3.uri(f"many/f{i:04d}")) for i in range(1003)])
    folders = [s3.uri("z"), s3.uri("z/"), s3.uri("z/sub"), f"s3://{s3.bucket}", s3.uri("many/"), s3.uri("bad"),
               s3.uri("dots")]
    results: dict[str, list[object]] = {}
    for client in ("boto3", "obstore"):
        monkeypatch.setenv("TRAINER_S3_CLIENT", client)
        before = s3_fast.requests
        results[client] = [_listing(uri) for uri in folders]
        assert (s3_fast.requests > before) == (client == "obstore"), client
    assert results["obstore"] == results["boto3"]
    z, _, _, root, many, bad, dots = results["obstore"]
    assert [row[0] for row in z][:3] == [s3.uri("z/other/"), s3.uri("z/sub/"), s3.uri("z/")]  # marker: with its "/"
    assert len(z) == 9 and len(many) == 1003 and (s3.uri("top.xml"), 7, False) == root[-1][:3]
    assert {row[0] for row in bad} == {s3.uri(key) for key in ("bad/./", "bad/a/", "bad/tab\t.xml", "bad/ok.xml")}
    assert {row[0] for row in dots} == {s3.uri("dots/../"), s3.uri("dots/ok.xml")}
    before = s3_fast.requests
    assert storage.read_bytes(s3.uri("bad/ok.xml")) == b"bad/ok.xml" and s3_fast.requests == before + 1
    monkeypatch.setenv("TRAINER_S3_CLIENT", "obstore")
    with pytest.raises(storage.StorageError) as fast_error:
        list(storage.list_objects("s3://no-such-bucket-listing/a/", recursive=False))
    monkeypatch.setenv("TRAINER_S3_CLIENT", "boto3")
    with pytest.raises(storage.StorageError) as boto3_error:
        list(storage.list_objects("s3://no-such-bucket-listing/a/", recursive=False))
    assert (type(fast_error.value), str(fast_error.value)) == (type(boto3_error.value), str(boto3_error.value))


_CONVERT_SCRIPT = """
import os, sys
from pathlib import Path
from trainer import s3_fast, storage
from trainer.annotations import convert
log = sys.argv[2] + "/calls.log"

def recorded(name, fn):
    def call(*args):
        before, result = s3_fast.requests, fn(*args)
        files = len(args[0]) if name == "parse" else 1
        with open(log, "a") as out:
            out.write(f"{name} {os.getpid() != parent} {s3_fast.requests - before} {files}\\n")
        return result
    return call

parent = os.getpid()
convert._list_names = recorded("list", convert._list_names)
convert.parse_chunk = recorded("parse", convert.parse_chunk)
result = convert.convert(convert.ConvertOptions(f"s3://{sys.argv[1]}/voc", f"s3://{sys.argv[1]}/coco", workers=2),
                         on_progress=lambda text: None)
print("exit", result.exit_code, result.images)
print("parent-requests", s3_fast.requests, s3_fast._runtime_pid is None)
print("calls", *sorted(Path(log).read_text().splitlines()))
"""


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_the_converter_lists_and_reads_through_the_fast_client_only_in_its_workers(s3: S3Env,
                                                                                   tmp_path: Path) -> None:
    """Its worker processes list both folders and read every XML through obstore from their first request (boto3
    would spend about 130 us of CPU per listed key); the main process, which forks them, never starts obstore."""
    make_voc(tmp_path / "voc", {f"{i:03d}.xml": voc_xml(f"{i:03d}.jpg", [("c", 1, 1, 5, 5)]) for i in range(80)},
             [f"{i:03d}.jpg" for i in range(80)])
    storage.copy_tree(tmp_path / "voc", s3.uri("voc"))
    lines = _run_script(_CONVERT_SCRIPT, s3.bucket, timeout=180, extra_args=[str(tmp_path)])
    assert lines["exit"] == "0 80"
    assert lines["parent-requests"] == "0 True"
    calls = lines["calls"].split()
    rows = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    # both folders, one request each, in the workers; the split files' folder is listed here, once per conversion
    assert [row for row in rows if row[0] == "list"] == [["list", "False", "0", "1"]] + [["list", "True", "1", "1"]] * 2
    parses = [row for row in rows if row[0] == "parse"]
    assert parses and all(row[1] == "True" and row[2] == row[3] for row in parses)  # a request per XML, none on boto3


@pytest.mark.skipif(s3_fast.obstore is None, reason="obstore is not installed")
def test_keys_obstore_would_misread_or_cannot_name_are_read_exactly(s3: S3Env,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """object_store drops a leading or trailing "/" (a GET of "e/" returned the object "e") and refuses empty, "."
    and ".." segments and control characters: each such key is read, streamed, ranged and stat'ed as itself, and
    the bucket's other reads stay on the fast client."""
    monkeypatch.setenv("TRAINER_S3_CLIENT", "obstore")
    odd = ["e/", "/x", "a//b", "a/./y", "a/../q", "t\tab", "sub/"]
    for key in ["e", "x", "a/b", "sub", *odd]:
        storage.write_bytes(s3.uri(key), key.encode() * 1000)
    before = s3_fast.requests
    for key in odd:
        uri = f"s3://{s3.bucket}/{key}"
        assert storage.read_bytes(uri) == key.encode() * 1000, key
        assert storage.stat(uri).size == len(key) * 1000, key
        with storage.open_read(uri, buffer_size=4096) as stream:
            stream.seek(len(key) * 500)
            assert stream.read(len(key)) == key.encode(), key
    assert [info.uri for info in storage.list_objects(f"s3://{s3.bucket}//", recursive=False)] == [s3.uri("/x")]
    assert s3_fast.requests == before  # none of them went through obstore
    assert storage.read_bytes(s3.uri("e")) == b"e" * 1000 and s3_fast.requests == before + 1
