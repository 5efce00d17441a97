"""The S3 read path's fast client: GET and HEAD through ``obstore`` (Rust, object_store), a fraction of boto3's CPU.

boto3 spends about 2 ms of client CPU per small GET (signing, botocore's request/response pipeline in Python);
obstore does the same request in Rust for about a quarter of that (``bench/storage.py``, "client CPU ms per GET").
Only the transport moves: what a read means stays in ``trainer.storage`` (resume of a cut body with a Range GET
pinned by If-Match, bounded retries, the one-line errors), which calls :func:`get` and :func:`head` here where it
called boto3's ``get_object``/``head_object`` before.

Everything a user configures for boto3 still applies, because it is read from boto3 itself: the endpoint and the
addressing style (path or virtual-hosted) of the storage layer's own boto3 client (``AWS_ENDPOINT_URL``,
``~/.aws/config``), its region, and its credentials object (keys, profiles, web identity, SSO, ...), handed to
obstore as a callback, so refreshable credentials refresh where boto3 refreshes them. obstore's own retries are
off: :func:`get` and :func:`head` retry throttling, server errors and failed connections themselves, with boto3's
``standard`` backoff and ``AWS_MAX_ATTEMPTS``, so both clients make the same number of attempts. An answer that is
neither data nor a transient failure (404, 403, a redirect, ...) raises :class:`Refused`; storage then asks boto3,
whose answer (and error message) is the one users get, so an error reads the same on either client.

Which process may use it: obstore runs a tokio runtime whose threads do not survive ``fork``. A process forked
from one that had started it (a DataLoader worker of a training process that read through obstore) would hang, so
it stays on boto3. To keep the runtime out of processes that fork readers, a process starts it only from its
``FAST_AFTER_READS``-th read (the first few reads of a training process or the converter -- config, indexes,
checkpoints -- go through boto3, and the workers they fork then read through obstore), and a process that has
torch loaded and was not itself forked (a training or inference process, which forks DataLoader workers) keeps its
own reads on boto3; its DataLoader workers, which never fork, use obstore from their first read.
A process that declares it starts no readers (:func:`no_readers_forked_from_here`: the converter's workers) uses
it from its first request. ``TRAINER_S3_CLIENT=boto3`` turns the fast client off; ``obstore`` uses it from the first
read in every process where it can run.

Keys: object_store reads a key with a leading or trailing slash as another object (``e/`` as ``e``), and cannot
spell some others (an empty, ``.`` or ``..`` segment, a control character). Such keys never reach it
(:func:`spells_exactly`, :class:`Unrepresentable`): boto3 serves those requests, and the bucket's others stay here.

Listings: a one-level listing (a folder's files, as the converter lists ``Annotations/`` and ``JPEGImages/``: two
keys per image) costs boto3 about 130 us of client CPU per key, parsing the XML pages in Python; obstore parses them
in Rust for about 6. object_store spells keys its own way in two cases, and :func:`list_folder` never lets that
through: a key it cannot represent (a ``.`` or ``..`` segment, an empty segment, a control character) fails the
whole listing, which storage then asks of boto3; a folder-marker key (``Annotations/`` itself) comes back without
its slash, outside the prefix, and gets it back. Recursive listings stay on boto3: there a marker ``a/b/`` and an
object ``a/b`` would come back alike. Writes, deletes and copies stay on boto3 too: they are not the hot path, and
s3transfer's multipart uploads and conditional PUTs have no equivalent we would want to re-test.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import botocore.exceptions as bex

if TYPE_CHECKING:
    import botocore.credentials

try:
    import obstore
    from obstore.exceptions import InvalidPathError, PreconditionError
    from obstore.store import S3Store
except ImportError:  # pragma: no cover - obstore is a dependency; without it every read uses boto3
    obstore = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FAST_AFTER_READS = 16
# obstore's tokio runtime starts one thread per core in every process that uses it: eight DataLoader workers on a
# 96-core GPU node would start 768. A process here waits on a few dozen requests at most (the loader's and the
# converter's fetch threads), which two threads serve; TOKIO_WORKER_THREADS, when the user sets it, wins.
RUNTIME_THREADS = 2
# Statuses and error codes botocore's ``standard`` retry mode treats as transient.
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "Throttling",
                "ThrottlingException", "ThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
                "BandwidthLimitExceeded", "RequestThrottled", "InternalError", "ServiceUnavailable"}

_lock = threading.Lock()
_stores: dict[tuple[Any, ...], Any] = {}
_boto3_only: set[tuple[Any, ...]] = set()  # buckets whose answers only boto3 handles (e.g. a region redirect)
_runtime_pid: int | None = None  # the process that started obstore's runtime (inherited by forked children)
_forked = False
_forks_no_readers = False  # this process declared that it starts no process that reads S3
_reads = 0
requests = 0  # requests this process sent through obstore (tests and the benchmark read it)


def _after_fork_in_child() -> None:
    global _forked, _forks_no_readers, _reads, requests
    _forked = True
    _forks_no_readers = False
    _reads = requests = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


class BodyCut(ConnectionError):
    """The response body broke off mid-transfer (the storage layer resumes it with a Range GET)."""


class Refused(Exception):
    """The fast client got an answer it does not interpret (404, 403, a redirect, ...): ask boto3 instead."""


class Unrepresentable(Refused):
    """A key (or a listed key) obstore cannot represent: boto3 serves that request, and the bucket's other requests
    stay on the fast client."""


class PreconditionLost(Exception):
    """If-Match failed: the object is no longer the version the read started with."""


# ------------------------------------------------------------------------------------------ choosing
def mode() -> str:
    return os.environ.get("TRAINER_S3_CLIENT", "auto").strip().lower() or "auto"


def runnable_here() -> bool:
    """obstore is installed and its runtime was not inherited through fork from another process."""
    return obstore is not None and _runtime_pid in (None, os.getpid())


def enabled(bucket_key: tuple[Any, ...]) -> bool:
    """Whether this read should go through obstore (counts the read toward ``FAST_AFTER_READS``)."""
    global _reads
    wanted = mode()
    if wanted == "boto3" or not runnable_here() or bucket_key in _boto3_only:
        return False
    if wanted == "obstore" or _runtime_pid == os.getpid() or _forks_no_readers:
        return True
    if "torch" in sys.modules and not _forked:
        return False  # a training/inference process: it forks DataLoader workers, which read through obstore
    if _forked and _in_loader_worker():
        return True  # a DataLoader worker never forks: no reason to spend its first reads on boto3
    _reads += 1
    return _reads >= FAST_AFTER_READS


def no_readers_forked_from_here() -> None:
    """Declare that this process will not fork processes that read S3 (a converter worker): its reads and listings
    may start obstore's runtime from the first one."""
    global _forks_no_readers
    _forks_no_readers = True


def spells_exactly(key: str) -> bool:
    """Whether obstore addresses exactly this key. object_store drops a leading or trailing "/" without a word (a
    GET of ``e/`` returns the object ``e``) and refuses empty, ``.`` and ``..`` segments and control characters
    (those raise, and :func:`call` makes them :class:`Unrepresentable`); any other character is sent as it is."""
    return not (key.startswith("/") or key.endswith("/") or "//" in key
                or ("." in key and ("/./" in (wrapped := f"/{key}/") or "/../" in wrapped)))


def _in_loader_worker() -> bool:
    data = sys.modules.get("torch.utils.data")  # never imports torch
    return data is not None and data.get_worker_info() is not None


def prefer_boto3(bucket_key: tuple[Any, ...], why: str) -> None:
    if bucket_key not in _boto3_only:
        log.info("s3://%s: boto3 answers where the fast client could not (%s); reads from it use boto3",
                 bucket_key[-1], why)
        _boto3_only.add(bucket_key)


# ------------------------------------------------------------------------------------------- stores
def _credential_provider(credentials: botocore.credentials.Credentials) -> Any:
    """obstore's callback: boto3's own credentials object (refreshable ones refresh inside botocore)."""
    import botocore.credentials  # loaded by boto3 already: a store is made from a boto3 client

    refreshable = isinstance(credentials, botocore.credentials.RefreshableCredentials)

    def provide() -> dict[str, Any]:
        frozen = credentials.get_frozen_credentials()
        expires = None
        if refreshable:  # ask again well before botocore's mandatory refresh window (10 minutes)
            expires = datetime.now(UTC) + timedelta(minutes=10)
            actual = getattr(credentials, "_expiry_time", None)
            if isinstance(actual, datetime):
                expires = min(expires, actual - timedelta(minutes=1))
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": expires}

    return provide


def _where(client: Any, bucket: str) -> tuple[str | None, bool]:
    """(endpoint, virtual-hosted?) as the boto3 client addresses ``bucket``, read from a presigned URL (no request).

    On AWS itself the endpoint is None: obstore then uses the regional endpoint boto3 sends requests to (a presigned
    URL names the global one).
    """
    url = urlsplit(client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"},
                                                 ExpiresIn=60))
    path_style = url.path.startswith(f"/{bucket}/")
    if (url.hostname or "").endswith(".amazonaws.com") and client.meta.region_name:
        return None, not path_style
    prefix = url.path[: -len(f"/{bucket}/k")] if path_style else url.path[: -len("/k")]
    return f"{url.scheme}://{url.netloc}{prefix}", not path_style


def _ca_bundle(session: Any) -> bytes | None:
    """The PEM certificates of AWS_CA_BUNDLE / ``ca_bundle`` in ~/.aws/config, as botocore finds them."""
    core = getattr(session, "_session", session)
    try:
        path = core.get_config_variable("ca_bundle")
        return Path(path).read_bytes() if path else None
    except Exception:
        return None


def store(bucket_key: tuple[Any, ...], bucket: str, client: Any, session: Any) -> Any:
    """The obstore store for ``bucket``, configured from the storage layer's boto3 client and session."""
    found = _stores.get(bucket_key)
    if found is not None:
        return found
    with _lock:
        found = _stores.get(bucket_key)
        if found is None:
            credentials = session.get_credentials()
            if credentials is None:
                raise bex.NoCredentialsError()
            endpoint, virtual = _where(client, bucket)
            options: Any = {"connect_timeout": "10s", "read_timeout": "60s", "timeout": "3600s",
                            "allow_http": (endpoint or "").startswith("http:")}
            ca_bundle = _ca_bundle(session)
            if ca_bundle:
                options["root_certificate"] = ca_bundle
            try:
                where: Any = {"endpoint": endpoint} if endpoint else {}
                found = S3Store(bucket, **where, region=client.meta.region_name or "us-east-1",
                                virtual_hosted_style_request=virtual, client_options=options,
                                retry_config={"max_retries": 0},
                                credential_provider=_credential_provider(credentials))
            except Exception as exc:  # a setting obstore cannot take: boto3 reads this bucket
                raise Refused(f"cannot configure the fast client: {str(exc).splitlines()[0]}") from exc
            _stores[bucket_key] = found
    return found


# ------------------------------------------------------------------------------------------ requests
def _status_code_message(text: str) -> tuple[int | None, str, str]:
    status = re.search(r"status code: (\d{3})", text)
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    return (int(status[1]) if status else None, code[1] if code else "", message[1] if message else "")


def translate(exc: Exception, endpoint: str, operation: str) -> BaseException:
    """An obstore exception as what the storage layer handles: a boto error, a cut body, a lost precondition or
    :class:`Refused`."""
    if isinstance(exc, PreconditionError):
        return PreconditionLost(str(exc).splitlines()[0])
    if isinstance(exc, InvalidPathError):  # its text quotes a key, which may hold any word the checks below look for
        return Unrepresentable("a key the fast client cannot spell")
    text = str(exc)
    status, code, message = _status_code_message(text)
    if status is not None:
        if status in _RETRY_STATUS or code in _RETRY_CODES:
            return bex.ClientError({"Error": {"Code": code or str(status), "Message": message},
                                    "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
        return Refused(f"{status} {code}".strip())
    if "body error" in text or "Body" in text or "IncompleteBody" in text or "decoding response" in text:
        return BodyCut(text.splitlines()[0])
    if "Connect" in text or "error sending request" in text or "dns" in text.lower():
        return bex.EndpointConnectionError(endpoint_url=endpoint)
    if "Timeout" in text or "timed out" in text:
        return bex.ReadTimeoutError(endpoint_url=endpoint)
    return Refused(text.splitlines()[0][:200])


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, bex.ClientError):
        return True  # translate() makes ClientErrors of retryable answers only
    return isinstance(exc, bex.EndpointConnectionError | bex.ReadTimeoutError)


def call(fn: Any, endpoint: str, operation: str) -> Any:
    """Run one obstore request with boto3's ``standard`` retry policy (attempts from ``AWS_MAX_ATTEMPTS``)."""
    global _runtime_pid, requests
    if _runtime_pid is None:  # the first request starts the runtime (creating a store does not)
        os.environ.setdefault("TOKIO_WORKER_THREADS", str(RUNTIME_THREADS))
        _runtime_pid = os.getpid()
    n = 0
    while True:
        try:
            result = fn()
        except ValueError as exc:  # obstore cannot spell the key or prefix ("a//b", "a/./b", a tab): nothing was sent
            raise Unrepresentable(f"{operation}: {str(exc).splitlines()[0][:200]}") from exc
        except Exception as exc:
            requests += 1
            if obstore is None or not isinstance(exc, obstore.exceptions.BaseError | OSError):
                raise
            mapped = translate(exc, endpoint, operation)
            # the attempts are read after a failure, not before every request (a read of os.environ each time)
            if not _transient(mapped) or n >= max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))) - 1:
                raise mapped from exc
            delay = min(20.0, random.random() * 2**n)
            log.debug("%s: %s, retrying in %.2fs", operation, type(mapped).__name__, delay)
            time.sleep(delay)
            n += 1
        else:
            requests += 1
            return result


class Body:
    """A GET response body with the ``read(n)``/``close()`` that the storage layer's readers use.

    A body that fits the first read is collected in one call (one round trip into Rust); longer ones stream.
    """

    def __init__(self, result: Any, endpoint: str, length: int) -> None:
        self._result = result
        self._endpoint = endpoint
        self._length = length
        self._chunks: Any = None
        self._left = b""

    def _pull(self, collect: Any) -> bytes:
        try:
            return collect()
        except StopIteration:
            return b""
        except Exception as exc:
            mapped = translate(exc, self._endpoint, "GetObject")
            raise (mapped if isinstance(mapped, BodyCut) else BodyCut(str(exc).splitlines()[0])) from exc

    def _next_chunk(self, size: int) -> bytes:
        if self._chunks is None:
            if self._length <= size:
                self._chunks = iter(())
                return self._pull(lambda: bytes(self._result.bytes()))
            self._chunks = iter(self._result.stream(min_chunk_size=max(size, 64 * 1024)))
        return self._pull(lambda: bytes(next(self._chunks)))

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._left]
            while chunk := self._next_chunk(1 << 30):
                parts.append(chunk)
            self._left = b""
            return b"".join(parts)
        if not self._left:
            self._left = self._next_chunk(size)
        out, self._left = self._left[:size], self._left[size:]
        return out

    def close(self) -> None:
        self._chunks = None
        self._left = b""


def get(target: Any, key: str, endpoint: str, start: int = 0, end: int | None = None,
        etag: str | None = None) -> dict[str, Any]:
    """GET ``key`` from byte ``start`` (to ``end``, exclusive), only if still ``etag``; a boto3-shaped response."""
    options: Any = {}
    if end is not None:
        options["range"] = (start, end)
    elif start:
        options["range"] = {"offset": start}
    if etag:
        options["if_match"] = etag
    result = call(lambda: obstore.get(target, key, options=options), endpoint, "GetObject")
    first, stop = result.range
    meta = result.meta
    return {"Body": Body(result, endpoint, stop - first), "ETag": meta.get("e_tag"), "ContentLength": stop - first,
            "ContentRange": f"bytes {first}-{stop - 1}/{meta['size']}", "Size": int(meta["size"])}


def head(target: Any, key: str, endpoint: str) -> dict[str, Any]:
    meta = call(lambda: obstore.head(target, key), endpoint, "HeadObject")
    return {"ContentLength": int(meta["size"]), "ETag": meta.get("e_tag"), "LastModified": meta.get("last_modified")}


def list_folder(target: Any, prefix: str, endpoint: str) -> dict[str, Any]:
    """The objects and sub-folders directly under ``prefix`` ("" or ending with "/"), every page followed, as one
    boto3-shaped ListObjectsV2 page: every key exactly as S3 spells it, in S3's order."""
    listed = call(lambda: obstore.list_with_delimiter(target, prefix or None), endpoint, "ListObjectsV2")
    contents = []
    for meta in listed["objects"]:
        key = meta["path"]
        if not key.startswith(prefix):
            if key + "/" != prefix:  # anything but the folder's marker, which object_store returns without "/"
                raise Unrepresentable(f"listed {key!r} outside {prefix!r}")
            key = prefix
        contents.append({"Key": key, "Size": int(meta["size"]), "LastModified": meta.get("last_modified"),
                         "ETag": meta.get("e_tag")})
    folders = [{"Prefix": folder + "/"} for folder in listed["common_prefixes"]]
    if any(not folder["Prefix"].startswith(prefix) for folder in folders):
        raise Unrepresentable(f"a sub-folder listed outside {prefix!r}")
    return {"Contents": contents, "CommonPrefixes": folders}


def reset() -> None:
    """Forget cached stores (tests that change the AWS environment get fresh ones anyway: stores are keyed by it)."""
    with _lock:
        _stores.clear()
        _boto3_only.clear()
