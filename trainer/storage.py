"""One place for I/O on URIs: local paths and ``s3://bucket/key``.

Data, checkpoints and run outputs all go through these functions so that atomicity, retries and error messages
are the same everywhere. S3 settings come from the standard AWS chain (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_PROFILE``, web-identity tokens, ...), so MinIO, Ceph or AWS work unchanged. No torch imports here.

Two S3 clients, one set of rules: reads (GET and HEAD) go through the fast client of ``trainer.s3_fast`` (obstore,
about a quarter of boto3's CPU per request) where it can run, everything else through boto3. Both sit under the
same functions here, so resume, ETag pinning, retries and error messages are written once. Writes, listings,
deletes and copies stay on boto3: they are not the hot path, and their multipart and conditional forms are tested
against it. ``TRAINER_S3_CLIENT=boto3`` puts reads back on boto3 (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, TypeVar

import botocore.exceptions as bex  # 20 ms; boto3 itself (0.3 s of imports) loads with the first S3 client

from trainer import s3_fast

if TYPE_CHECKING:
    import boto3
    from boto3.s3.transfer import TransferConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Objects up to this size move with one request; larger ones use multipart transfers.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
DEFAULT_WORKERS = 32
# Body reads cut mid-stream (connection reset, truncated response) are retried this many times.
STREAM_ATTEMPTS = 6
_TMP_MARKER = ".trainer-tmp-"
# Atomic local writes go through mkstemp (mode 0600); the final file gets the usual mode under the umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------- errors
class StorageError(Exception):
    """A storage operation failed for a reason a user can act on; the message names the URI and the cause."""

    def __init__(self, uri: str, cause: str) -> None:
        super().__init__(f"{uri}: {cause}")
        self.uri = uri
        self.cause = cause


class NotFound(StorageError):
    """The object, file or bucket does not exist."""


class BucketNotFound(NotFound):
    """The bucket itself does not exist: a configuration error, never an "empty" answer."""


class AccessDenied(StorageError):
    """The credentials are valid but not allowed to do this."""


class CredentialsError(StorageError):
    """No credentials, or credentials the endpoint does not accept."""


class EndpointUnreachable(StorageError):
    """The S3 endpoint could not be reached (after retries)."""


class PreconditionFailed(StorageError):
    """A conditional write lost its race: the object already exists (create) or changed meanwhile (replace)."""


class TooLarge(StorageError):
    """The file or object is larger than the read allows (a bound a caller sets on untrusted input)."""

    def __init__(self, uri: str, size: int, limit: int) -> None:
        super().__init__(uri, f"{size} bytes, more than the {limit} this read allows")
        self.size = size
        self.limit = limit


# ------------------------------------------------------------------------------------------------ URIs
@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


_WHITESPACE = re.compile(r"\s")  # what str.isspace() calls a space, every code point of it


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri)[:5].lower() == "s3://"


def parse(uri: str | os.PathLike[str]) -> S3Location | Path:
    """Split a URI into an S3 location or a local path; anything else is a clear error."""
    text = os.fspath(uri)
    if is_s3(text):
        bucket, _, key = text[5:].partition("/")
        if not bucket or _WHITESPACE.search(bucket) or bucket in (".", ".."):
            raise StorageError(text, "not a valid S3 URI (expected s3://bucket/key)")
        return S3Location(bucket, key)
    if text.startswith("file://"):
        return Path(text[7:])
    if "://" in text:
        raise StorageError(text, "unsupported URI scheme (use s3://bucket/key or a local path)")
    if not text:
        raise StorageError(text, "empty path")
    return Path(text)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or S3 URI with '/' semantics."""
    text = os.fspath(base)
    if is_s3(text):
        out = text
        for part in parts:
            out = out.rstrip("/") + "/" + part.lstrip("/") if out[5:].rstrip("/") else "s3://" + part
        return out
    return os.path.join(text, *parts)


def basename(uri: str | os.PathLike[str]) -> str:
    """The last path component ("f.txt" for s3://b/dir/f.txt or /x/dir/f.txt)."""
    text = os.fspath(uri)
    return text.rstrip("/").rpartition("/")[2] if is_s3(text) else os.path.basename(text.rstrip(os.sep))


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object (or, for non-recursive listings, a sub-directory with ``is_dir``)."""

    uri: str
    size: int
    mtime: datetime | None = None
    etag: str | None = None
    is_dir: bool = False


# --------------------------------------------------------------------------------------------- clients
_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], tuple[Any, Any]] = {}

# Environment variables that change which endpoint, credentials or retry policy a client uses.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
)


# botocore's data loader: the parsed service models and endpoint rules, 0.2-0.4 s of JSON decoding for each new
# session. It holds no sockets or credentials, so the sessions of this process and of the processes forked from it
# (DataLoader workers, converter workers) share one per data path: a forked worker's first client costs about 40 ms
# instead of 0.4 s of CPU. Sessions themselves are not shared: credential providers may hold connections.
_data_loaders: dict[Any, Any] = {}


def _new_session() -> boto3.session.Session:
    import boto3.session
    import botocore.session

    core = botocore.session.get_session()
    data_path = core.get_config_variable("data_path")
    loader = _data_loaders.get(data_path)
    if loader is None:
        loader = _data_loaders[data_path] = core.get_component("data_loader")
    else:
        core.register_component("data_loader", loader)
    session = boto3.session.Session(botocore_session=core)
    loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))  # boto3 appends its data path every time
    return session


def _reset_client_lock_in_child() -> None:
    """A fork taken while another thread held the lock would leave it held forever in the child."""
    global _client_lock
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_client_lock_in_child)


# os.environ.get costs about 0.6 us a name (it encodes the name and decodes the value in Python), and every S3
# request asks for the 14 above: 9 us, 5% of the client CPU of a small GET. os.environ keeps its contents in a
# plain dict of encoded names and values, which every change made through os.environ updates (set, delete, clear,
# update: what tests and users do), so reading that dict sees exactly what os.environ.get would, for a twentieth
# of the cost. Were os.environ replaced, or without that dict, the plain reads are used.
_environ = os.environ
_environ_data = getattr(_environ, "_data", None)
_CLIENT_ENV_ENCODED = tuple(map(_environ.encodekey, _CLIENT_ENV)) if isinstance(_environ_data, dict) else ()


def _client_key() -> tuple[Any, ...]:
    if os.environ is _environ and _CLIENT_ENV_ENCODED:
        return (os.getpid(), *map(_environ_data.get, _CLIENT_ENV_ENCODED))  # type: ignore[union-attr]
    return (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))


def s3_client() -> Any:
    """A thread-safe S3 client for this process and the current AWS settings.

    Clients are cached per process id (a forked DataLoader worker must not share its parent's sockets) and per
    AWS environment (a test or a command that switches endpoint gets a fresh client).
    """
    return _client_and_session(_client_key())[0]


def _client_and_session(key: tuple[Any, ...]) -> tuple[Any, Any]:
    found = _clients.get(key)
    if found is not None:
        return found
    with _client_lock:  # boto3 sessions are not thread-safe; clients are.
        found = _clients.get(key)
        if found is None:
            from botocore.config import Config

            config = Config(
                retries={
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
                },
                max_pool_connections=DEFAULT_WORKERS * 2,
                connect_timeout=10,
                read_timeout=60,
                tcp_keepalive=True,
            )
            try:
                session = _new_session()
                found = (session.client("s3", config=config), session)
            except (bex.BotoCoreError, ValueError) as exc:
                raise StorageError("s3://", f"cannot configure the S3 client: {exc}") from exc
            _clients[key] = found
    return found


def forks_no_readers() -> None:
    """Declare that this process starts no process that reads S3 (a converter worker): the fast client may then
    serve its reads and listings from the first one (see trainer/s3_fast.py)."""
    s3_fast.no_readers_forked_from_here()


def _fast(loc: S3Location, key: str | None = None) -> tuple[Any, str] | None:
    """(obstore store, endpoint) when this read of ``key`` (default: the location's) goes through the fast client
    (see trainer/s3_fast.py), else None."""
    if not s3_fast.spells_exactly(loc.key if key is None else key):
        return None  # boto3 reads it: the fast client would read another object, or cannot name it
    bucket_key = (*_client_key(), loc.bucket)
    if not s3_fast.enabled(bucket_key):
        return None
    client, session = _client_and_session(bucket_key[:-1])
    try:
        return s3_fast.store(bucket_key, loc.bucket, client, session), str(client.meta.endpoint_url)
    except s3_fast.Refused as exc:
        s3_fast.prefer_boto3(bucket_key, str(exc))
        return None


def _transfer_config(download: bool = False) -> TransferConfig:
    """s3transfer settings for multipart transfers.

    Uploads use 8 MB parts (the transfer manager's default, fastest on the servers we measured); downloads use
    16 MB ranges, which halves the request count and measured about 2x faster than the defaults (bench/storage.py).
    """
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNK if download else 8 * 1024 * 1024,
        max_concurrency=10,
        use_threads=True,
    )


# ------------------------------------------------------------------------------------- error mapping
@functools.cache
def _stream_errors() -> tuple[type[BaseException], ...]:
    import http.client  # loaded with boto3 (urllib3), as urllib3 is: 15 ms that local-only commands never pay

    import urllib3.exceptions

    return (
        bex.ResponseStreamingError,
        bex.IncompleteReadError,
        bex.ReadTimeoutError,
        bex.ConnectionClosedError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.ReadTimeoutError,
        http.client.IncompleteRead,
        ConnectionError,
        TimeoutError,
    )


def _incomplete_read(missing: int) -> Exception:
    """A body that ended ``missing`` bytes early, as http.client reports it (a transient error: see
    _stream_errors)."""
    import http.client

    return http.client.IncompleteRead(b"", missing)


def _endpoint() -> str:
    try:
        return str(s3_client().meta.endpoint_url)
    except StorageError:
        return "the S3 endpoint"


def _probe_error_code(bucket: str) -> str | None:
    """HEAD responses carry no error body; a one-key listing of the bucket tells the real cause."""
    try:
        s3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)
        return None
    except bex.ClientError as exc:
        return str(exc.response.get("Error", {}).get("Code", "")) or None
    except bex.BotoCoreError:
        return None


def _explain(uri: str, exc: BaseException, *, is_read: bool = True) -> StorageError:
    """Turn a boto/OS exception into one StorageError whose message a user can act on."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        loc = parse(uri)
        bucket = loc.bucket if isinstance(loc, S3Location) else ""
        if bucket and code.isdigit():
            code = _probe_error_code(bucket) or code
        if code == "NoSuchBucket":
            return BucketNotFound(uri, f"bucket '{bucket}' does not exist at {_endpoint()}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(uri, "no such object" if is_read else "not found")
        if code in ("InvalidAccessKeyId", "InvalidToken", "InvalidClientTokenId"):
            return CredentialsError(uri, f"the access key is not recognised by {_endpoint()} ({code})")
        if code in ("SignatureDoesNotMatch", "AuthorizationHeaderMalformed"):
            return CredentialsError(uri, f"the credentials were rejected: wrong secret key or region ({code})")
        if code in ("ExpiredToken", "TokenRefreshRequired", "RequestExpired"):
            return CredentialsError(uri, f"the credentials have expired ({code})")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status == 412:
            return PreconditionFailed(uri, "changed by another writer (conditional write refused)")
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return AccessDenied(uri, "access denied: the credentials lack permission for this bucket or key")
        message = err.get("Message") or exc
        return StorageError(uri, f"S3 error {code or status}: {message}")
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return CredentialsError(
            uri,
            "no usable AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "or give the pod a service-account role",
        )
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return EndpointUnreachable(uri, f"cannot reach the S3 endpoint {_endpoint()} ({type(exc).__name__})")
    if isinstance(exc, bex.ParamValidationError):
        return StorageError(uri, f"invalid request: {exc}")
    if isinstance(exc, FileNotFoundError):
        return NotFound(uri, "no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return StorageError(uri, "is a directory")
    if isinstance(exc, NotADirectoryError | FileExistsError):  # mkdir meets a file where a directory must be
        return StorageError(uri, "a parent of this path is a file, not a directory")
    if isinstance(exc, PermissionError):
        return AccessDenied(uri, "permission denied")
    if isinstance(exc, _stream_errors()):
        return StorageError(uri, f"the transfer kept failing after retries ({type(exc).__name__}: {exc})")
    if isinstance(exc, bex.BotoCoreError | OSError):
        return StorageError(uri, f"{type(exc).__name__}: {exc}")
    raise exc


def _retry_stream(uri: str, attempt: Callable[[], T]) -> T:
    """Retry an operation whose response body can be cut mid-stream (botocore retries only up to the headers)."""
    for n in range(STREAM_ATTEMPTS):
        try:
            return attempt()
        except _stream_errors() as exc:
            if n == STREAM_ATTEMPTS - 1:
                raise _explain(uri, exc) from exc
            delay = random.uniform(0, min(5.0, 0.1 * 2**n))
            log.debug("%s: transfer interrupted (%s), retrying in %.2fs", uri, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _errors(uri: str, *, is_read: bool = True) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (bex.BotoCoreError, bex.ClientError, OSError) as exc:
        raise _explain(uri, exc, is_read=is_read) from exc


# ---------------------------------------------------------------------------------------------- reads
class _S3RangeReader(io.RawIOBase):
    """A seekable, read-only view of one S3 object that resumes with a Range GET when the body is cut.

    Every request after the first carries ``If-Match`` with the first response's ETag, so a resumed read can
    never stitch together two versions of an object that was overwritten meanwhile.
    """

    def __init__(self, loc: S3Location) -> None:
        super().__init__()
        self._loc = loc
        self._uri = str(loc)
        self._pos = 0
        self._body: Any = None
        self._etag: str | None = None
        self.size = -1
        with _errors(self._uri):
            head = _head(loc)
        self.size = int(head["ContentLength"])
        self._etag = head.get("ETag")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        new = max(0, base + offset)
        if new != self._pos:
            self._drop_body()
            self._pos = new
        return self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def _open_body(self) -> None:
        with _errors(self._uri):
            self._body = _get_from(self._loc, self._uri, self._pos, self._etag)["Body"]

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self._pos)
        if want <= 0:
            return 0

        def attempt() -> int:
            if self._body is None:
                self._open_body()
            try:
                chunk = self._body.read(want)
            except BaseException:
                self._drop_body()
                raise
            if not chunk:
                self._drop_body()
                raise _incomplete_read(want)
            return _copy_into(buffer, chunk)

        got = _retry_stream(self._uri, attempt)
        self._pos += got
        return got

    def close(self) -> None:
        self._drop_body()
        super().close()


def _head(loc: S3Location) -> dict[str, Any]:
    fast = _fast(loc)
    refused = None
    if fast is not None:
        try:
            return s3_fast.head(fast[0], loc.key, fast[1])
        except s3_fast.Refused as exc:  # 404/403/...: boto3's answer is the one users get
            refused = exc
    head: dict[str, Any] = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    if refused is not None and not isinstance(refused, s3_fast.Unrepresentable):
        s3_fast.prefer_boto3((*_client_key(), loc.bucket), str(refused))  # boto3 read what obstore could not
    return head


def _fast_list_folder(loc: S3Location, prefix: str) -> dict[str, Any] | None:
    """A one-level listing through the fast client when this process uses it, as one boto3-shaped page (every page
    followed); None: list with boto3 (also when the folder holds a key the fast client cannot spell). A refusal
    does not move the bucket's reads to boto3: a listing can fail on a key that no read is about."""
    fast = _fast(loc, prefix[:-1]) if prefix != "/" else None  # "/": the empty name under the root, not the root
    if fast is None:
        return None
    try:
        return s3_fast.list_folder(fast[0], prefix, fast[1])
    except s3_fast.Refused:  # 404, 403, ...: boto3's answer (and error) is the one users get
        return None


def _get_from(loc: S3Location, uri: str, start: int, etag: str | None, end: int | None = None) -> dict[str, Any]:
    """GET the object from byte ``start`` (to ``end``, exclusive); with ``etag``, only if it is still that version
    (a resumed read must never stitch two versions of an overwritten object together).

    Through the fast client when this process uses it (trainer/s3_fast.py); an answer it does not interpret is
    asked again of boto3, so errors are boto3's own.
    """
    fast = _fast(loc)
    if fast is not None:
        try:
            return s3_fast.get(fast[0], loc.key, fast[1], start, end, etag)
        except s3_fast.PreconditionLost as exc:
            raise StorageError(uri, "the object changed while it was being read") from exc
        except s3_fast.Refused as exc:
            response = _boto3_get(loc, uri, start, etag, end)
            if not isinstance(exc, s3_fast.Unrepresentable):  # one odd key does not move the bucket to boto3
                s3_fast.prefer_boto3((*_client_key(), loc.bucket), str(exc))  # boto3 read what obstore could not
            return response
    return _boto3_get(loc, uri, start, etag, end)


def _boto3_get(loc: S3Location, uri: str, start: int, etag: str | None, end: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
    if start or end is not None:
        args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    if etag:
        args["IfMatch"] = etag
    try:
        response: dict[str, Any] = s3_client().get_object(**args)
        return response
    except bex.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
            raise StorageError(uri, "the object changed while it was being read") from exc
        raise


def _copy_into(buffer: Any, chunk: bytes) -> int:
    view = memoryview(buffer).cast("B")
    view[: len(chunk)] = chunk
    return len(chunk)


def open_read(uri: str | os.PathLike[str], buffer_size: int = 1 << 20) -> IO[bytes]:
    """A seekable binary stream over a file or object; S3 reads resume transparently after a cut connection."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, S3Location):
        return io.BufferedReader(_S3RangeReader(loc), buffer_size=buffer_size)
    with _errors(text):
        return open(loc, "rb")  # the caller owns the stream


def read_bytes(uri: str | os.PathLike[str], size_hint: int | None = None, max_bytes: int | None = None) -> bytes:
    """The whole content of a file or object.

    ``size_hint`` (e.g. from a manifest) above the multipart threshold fetches an S3 object as parallel ranged
    GETs pinned to one ETag, about twice as fast as one stream for large checkpoints.
    ``max_bytes`` refuses anything larger with :class:`TooLarge` before its content is read (the size comes from
    the file system or from the GET's headers): the bound for untrusted inputs read whole, such as annotation files.
    """
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        with _errors(text):
            return loc.read_bytes() if max_bytes is None else _read_local_at_most(loc, text, max_bytes)
    with _errors(text):
        if size_hint is not None and size_hint > MULTIPART_THRESHOLD:
            if _fast(loc) is None:
                if max_bytes is not None and (size := stat(text).size) > max_bytes:
                    raise TooLarge(text, size, max_bytes)
                buffer = io.BytesIO()
                s3_client().download_fileobj(loc.bucket, loc.key, buffer, Config=_transfer_config(download=True))
                return buffer.getvalue()
            return _read_parallel(loc, text, max_bytes)
        return _read_span(loc, text, 0, None, None, max_bytes)[0]


def _read_local_at_most(path: Path, uri: str, max_bytes: int) -> bytes:
    """A local file whole, refused when its size, or what it turns out to hold (a file still growing, a device
    that reports no size), passes ``max_bytes``."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise TooLarge(uri, size, max_bytes)
        data = stream.read(size) if size else b""
        parts, received = [data], len(data)
        while chunk := stream.read(min(1 << 16, max_bytes + 1 - received)):  # more than its size said
            parts.append(chunk)
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(uri, received, max_bytes)
        return data if len(parts) == 1 else b"".join(parts)


def _read_span(loc: S3Location, uri: str, start: int, end: int | None, etag: str | None,
               max_bytes: int | None = None) -> tuple[bytes, str, int]:
    """Bytes ``start``..``end`` (exclusive; None: to the end), the ETag and the object's size; a body cut
    mid-stream resumes where it stopped, pinned to the first response's ETag. With ``max_bytes``, a longer
    span is refused (:class:`TooLarge`) as soon as the first response's headers give its length."""
    parts: list[bytes] = []
    received = 0
    total: int | None = None
    size = -1

    def attempt() -> None:
        nonlocal received, etag, total, size
        response = _get_from(loc, uri, start + received, etag, end)
        etag = etag or response.get("ETag")
        if total is None:
            total = received + int(response["ContentLength"])
            size = _object_size(response, total)
        body = response["Body"]
        try:
            if max_bytes is not None and total > max_bytes:
                raise TooLarge(uri, size, max_bytes)
            while chunk := body.read(1 << 20):  # to the end, where botocore also checks the length it was given
                parts.append(chunk)
                received += len(chunk)
        finally:
            body.close()
        if received < total:
            raise _incomplete_read(total - received)

    _retry_stream(uri, attempt)
    return b"".join(parts), etag or "", size


def _object_size(response: dict[str, Any], fallback: int) -> int:
    if response.get("Size") is not None:
        return int(response["Size"])
    content_range = response.get("ContentRange")
    return int(str(content_range).rpartition("/")[2]) if content_range else fallback


def _read_parallel(loc: S3Location, uri: str, max_bytes: int | None = None) -> bytes:
    """A large object as 16 MB ranged GETs, 10 at a time, all pinned to the ETag of the first one; one over
    ``max_bytes`` is refused once the first answer gives its size."""
    first, etag, size = _read_span(loc, uri, 0, MULTIPART_CHUNK, None)
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(uri, size, max_bytes)
    starts = range(len(first), size, MULTIPART_CHUNK)
    with ThreadPoolExecutor(max_workers=10, thread_name_prefix="storage-get") as pool:
        rest = list(pool.map(lambda s: _read_span(loc, uri, s, min(size, s + MULTIPART_CHUNK), etag)[0], starts))
    data = b"".join([first, *rest])
    if len(data) != size:
        raise StorageError(uri, f"read {len(data)} bytes of {size}")
    return data


def read_text(uri: str | os.PathLike[str], encoding: str = "utf-8", max_bytes: int | None = None) -> str:
    text = os.fspath(uri)
    data = read_bytes(text, max_bytes=max_bytes)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise StorageError(text, f"not valid {encoding} text (byte {exc.start})") from exc


def stat(uri: str | os.PathLike[str]) -> ObjectInfo:
    text = os.fspath(uri)
    loc = parse(text)
    with _errors(text):
        if isinstance(loc, S3Location):
            head = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
            return ObjectInfo(text, int(head["ContentLength"]), head.get("LastModified"), head.get("ETag"))
        st = loc.stat()
        if loc.is_dir():
            return ObjectInfo(text, 0, _local_time(st.st_mtime), is_dir=True)
        return ObjectInfo(text, st.st_size, _local_time(st.st_mtime))


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file or object (not a directory) exists. A missing bucket is an error, not False: it means
    a wrong configuration, and treating it as "absent" would, say, start a training run from scratch."""
    try:
        return not stat(uri).is_dir
    except BucketNotFound:
        raise
    except NotFound:
        return False


def is_dir(uri: str | os.PathLike[str]) -> bool:
    """Local: an existing directory. S3: a URI ending with '/' or a key that has objects below it."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        return loc.is_dir()
    if not loc.key or loc.key.endswith("/"):
        return True
    with _errors(text):
        page = s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key + "/", MaxKeys=1)
    return bool(page.get("KeyCount"))


def _local_time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


# ---------------------------------------------------------------------------------------------- lists
def list_objects(uri: str | os.PathLike[str], recursive: bool = True) -> Iterator[ObjectInfo]:
    """Objects under a directory or prefix, in key order, following every page.

    ``s3://b/runs`` lists the keys below ``runs/``; if the URI names one object, that object alone is listed.
    Non-recursive listings also yield sub-directories (``is_dir=True``), like ``ls``.
    """
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        yield from _list_local(text, loc, recursive)
        return
    prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
    found = False
    args: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": prefix}
    if not recursive:
        args["Delimiter"] = "/"
    with _errors(text):
        page = None if recursive else _fast_list_folder(loc, prefix)
        pages = [page] if page is not None else s3_client().get_paginator("list_objects_v2").paginate(**args)
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                found = True
                yield ObjectInfo(f"s3://{loc.bucket}/{common['Prefix']}", 0, is_dir=True)
            for obj in page.get("Contents", []):
                found = True
                yield ObjectInfo(
                    f"s3://{loc.bucket}/{obj['Key']}", int(obj["Size"]), obj.get("LastModified"), obj.get("ETag")
                )
    if not found and loc.key and not loc.key.endswith("/"):
        with contextlib.suppress(NotFound):
            yield stat(text)


def _list_local(text: str, root: Path, recursive: bool) -> Iterator[ObjectInfo]:
    with _errors(text):
        if root.is_file():
            yield stat(root)
            return
        if not root.exists():
            raise FileNotFoundError(text)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    for entry in entries:
        if _TMP_MARKER in entry.name:
            continue
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from _list_local(entry.path, Path(entry.path), recursive)
            else:
                yield ObjectInfo(entry.path + os.sep, 0, is_dir=True)
        elif entry.is_file():
            st = entry.stat()
            yield ObjectInfo(entry.path, st.st_size, _local_time(st.st_mtime))


# --------------------------------------------------------------------------------------------- writes
@contextlib.contextmanager
def _local_atomic(path: Path, uri: str) -> Iterator[IO[bytes]]:
    """A temp file beside ``path`` that replaces it only when the block ends without an exception."""
    with _errors(uri, is_read=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}{_TMP_MARKER}")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _explain(uri, exc, is_read=False) from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Replace a file or object atomically: readers see the old content or the new, never a mix."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        with _local_atomic(loc, text) as handle:
            handle.write(data)
        return
    if len(data) <= MULTIPART_THRESHOLD:
        with _errors(text, is_read=False):
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        return
    with _errors(text, is_read=False):
        s3_client().upload_fileobj(io.BytesIO(data), loc.bucket, loc.key, Config=_transfer_config())


def write_text(uri: str | os.PathLike[str], text_data: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text_data.encode(encoding))


# ---------------------------------------------------------------------------------- conditional writes
# Compare-and-swap on one small object, for the run lease: S3 conditional PUTs (If-None-Match: * to create,
# If-Match: <etag> to replace), and on local disk an exclusive hard link and a lock file around read-compare-write.
@dataclass(frozen=True)
class Versioned:
    """An object's content with the version tag a conditional replace must name."""

    data: bytes
    etag: str


def _local_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@contextlib.contextmanager
def _local_lock(path: Path, uri: str) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (flock: released by the kernel if the holder dies)."""
    with _errors(uri, is_read=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_versioned(uri: str | os.PathLike[str]) -> Versioned:
    """A small object's content and version tag (raises NotFound when it does not exist)."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        with _errors(text):
            data = loc.read_bytes()
        return Versioned(data, _local_etag(data))
    with _errors(text):
        response = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
        return Versioned(response["Body"].read(), str(response["ETag"]))


def create_exclusive(uri: str | os.PathLike[str], data: bytes) -> str:
    """Create an object that must not exist yet; its version tag, or PreconditionFailed when it exists."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, S3Location):
        with _errors(text, is_read=False):
            return str(s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")["ETag"])
    with _local_lock(loc, text), _errors(text, is_read=False):
        fd, tmp = tempfile.mkstemp(dir=loc.parent, prefix=f".{loc.name[:64]}{_TMP_MARKER}")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
            try:
                os.link(tmp, loc)  # atomic, and refuses an existing name: a complete file or nothing
            except FileExistsError as exc:
                raise PreconditionFailed(text, "already exists (exclusive create refused)") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(loc.parent)
    return _local_etag(data)


def replace_if_match(uri: str | os.PathLike[str], data: bytes, etag: str) -> str:
    """Replace an object only if it is still the version ``etag``; the new tag, or PreconditionFailed."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, S3Location):
        with _errors(text, is_read=False):
            return str(s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=etag)["ETag"])
    with _local_lock(loc, text):
        try:
            current = read_versioned(text)
        except NotFound as exc:
            raise PreconditionFailed(text, "no longer exists (conditional replace refused)") from exc
        if current.etag != etag:
            raise PreconditionFailed(text, "changed by another writer (conditional replace refused)")
        with _local_atomic(loc, text) as handle:
            handle.write(data)
    return _local_etag(data)


@contextlib.contextmanager
def open_write(uri: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary stream that becomes the file or object only if the block ends without an exception.

    S3 writes are spooled to a local temp file (memory up to the multipart threshold) and uploaded on exit.
    """
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        with _local_atomic(loc, text) as handle:
            yield handle
        return
    with tempfile.SpooledTemporaryFile(max_size=MULTIPART_THRESHOLD) as spool:
        yield spool
        size = spool.tell()
        spool.seek(0)
        with _errors(text, is_read=False):
            if size <= MULTIPART_THRESHOLD:
                s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=spool.read())
            else:
                s3_client().upload_fileobj(spool, loc.bucket, loc.key, Config=_transfer_config())


def delete(uri: str | os.PathLike[str]) -> None:
    """Remove a file or object; removing what is already gone is not an error."""
    text = os.fspath(uri)
    loc = parse(text)
    with _errors(text, is_read=False):
        if isinstance(loc, S3Location):
            s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)
        else:
            loc.unlink(missing_ok=True)


def delete_prefix(uri: str | os.PathLike[str]) -> int:
    """Remove everything under a directory or prefix; returns how many objects were removed."""
    text = os.fspath(uri)
    loc = parse(text)
    if isinstance(loc, Path):
        count = sum(1 for _ in _list_local(text, loc, True)) if loc.exists() else 0
        with _errors(text, is_read=False):
            if loc.is_dir():
                shutil.rmtree(loc)
            elif loc.exists():
                loc.unlink()
        return count
    keys = [parse(info.uri).key for info in list_objects(text) if not info.is_dir]  # type: ignore[union-attr]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        with _errors(text, is_read=False):
            response = s3_client().delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
        if errors := response.get("Errors"):
            first = errors[0]
            raise StorageError(
                f"s3://{loc.bucket}/{first.get('Key')}",
                f"delete failed for {len(errors)} objects: {first.get('Code')} {first.get('Message')}",
            )
    return len(keys)


# -------------------------------------------------------------------------------------------- copying
def upload_file(path: str | os.PathLike[str], uri: str | os.PathLike[str], size: int | None = None) -> int:
    """Upload a local file (multipart above the threshold; an object appears only when complete)."""
    return copy(path, uri, size=size)


def download_file(uri: str | os.PathLike[str], path: str | os.PathLike[str], size: int | None = None) -> int:
    """Download an object to a local file, atomically."""
    return copy(uri, path, size=size)


def copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], size: int | None = None) -> int:
    """Copy one file or object to another place (local↔S3, S3↔S3, local↔local); returns the bytes copied.

    ``size``, when the caller already knows it from a listing, saves a HEAD request for small objects.
    """
    src_text, dst_text = os.fspath(src), os.fspath(dst)
    src_loc, dst_loc = parse(src_text), parse(dst_text)
    if isinstance(src_loc, Path):
        with _errors(src_text):
            size = src_loc.stat().st_size
            if src_loc.is_dir():
                raise IsADirectoryError(src_text)
        if isinstance(dst_loc, Path):
            with _errors(src_text), src_loc.open("rb") as reader, _local_atomic(dst_loc, dst_text) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
        elif size <= MULTIPART_THRESHOLD:
            with _errors(src_text):
                data = src_loc.read_bytes()
            with _errors(dst_text, is_read=False):
                s3_client().put_object(Bucket=dst_loc.bucket, Key=dst_loc.key, Body=data)
        else:
            with _errors(dst_text, is_read=False):
                s3_client().upload_file(str(src_loc), dst_loc.bucket, dst_loc.key, Config=_transfer_config())
        return size
    if size is None:
        size = stat(src_text).size
    if isinstance(dst_loc, Path):
        if size <= MULTIPART_THRESHOLD:
            data = read_bytes(src_text)
            with _local_atomic(dst_loc, dst_text) as writer:
                writer.write(data)
        else:
            with _errors(dst_text, is_read=False):
                dst_loc.parent.mkdir(parents=True, exist_ok=True)
            with _errors(src_text):  # s3transfer writes a temp file, retries cut bodies, then renames
                s3_client().download_file(src_loc.bucket, src_loc.key, str(dst_loc),
                                          Config=_transfer_config(download=True))
        return size
    with _errors(src_text):
        source = {"Bucket": src_loc.bucket, "Key": src_loc.key}
        if size <= MULTIPART_THRESHOLD:
            s3_client().copy_object(CopySource=source, Bucket=dst_loc.bucket, Key=dst_loc.key)
        else:
            s3_client().copy(source, dst_loc.bucket, dst_loc.key, Config=_transfer_config())
    return size


@dataclass
class TransferSummary:
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def copy_many(
    pairs: Iterable[tuple[str, str] | tuple[str, str, int | None]],
    workers: int = DEFAULT_WORKERS,
    on_done: Callable[[str, int], None] | None = None,
) -> TransferSummary:
    """Copy many (src, dst[, size]) pairs concurrently over one shared client.

    The first failure stops new copies and is raised (copies already finished stay in place).
    """
    jobs = [(p[0], p[1], p[2] if len(p) > 2 else None) for p in pairs]
    summary = TransferSummary()
    start = time.perf_counter()
    if not jobs:
        return summary
    failure: tuple[str, BaseException] | None = None
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="storage") as pool:
        futures: dict[Future[int], str] = {pool.submit(copy, src, dst, size): dst for src, dst, size in jobs}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                if failure is None:
                    failure = (futures[future], exc)
                    for other in futures:
                        other.cancel()
                continue
            summary.objects += 1
            summary.bytes += future.result()
            if on_done:
                on_done(futures[future], future.result())
    summary.seconds = time.perf_counter() - start
    if failure is not None:
        error = _explain(*failure)
        cause = f"{error.cause} ({summary.objects} of {len(jobs)} copies finished)"
        raise type(error)(error.uri, cause) from failure[1]
    return summary


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], workers: int = DEFAULT_WORKERS,
              on_done: Callable[[str, int], None] | None = None) -> TransferSummary:
    """Copy every object under ``src`` to the same relative place under ``dst`` (any mix of local and S3)."""
    src_text, dst_text = os.fspath(src), os.fspath(dst)
    return copy_many(plan_tree_copy(src_text, dst_text), workers=workers, on_done=on_done)


def plan_tree_copy(src: str, dst: str) -> list[tuple[str, str, int]]:
    """(src, dst, size) for each object under ``src``; refuses keys that would escape a local ``dst``."""
    src_loc = parse(src)
    if isinstance(src_loc, S3Location):
        root = src_loc.key if not src_loc.key or src_loc.key.endswith("/") else src_loc.key + "/"
    else:
        root = str(src_loc)
    dst_is_local = isinstance(parse(dst), Path)
    plan = []
    for info in list_objects(src, recursive=True):
        if isinstance(src_loc, S3Location):
            key = parse(info.uri).key  # type: ignore[union-attr]
            if key.endswith("/"):
                continue  # a zero-byte "folder" marker made by S3 consoles
            if not key.startswith(root):  # the URI named one object, not a prefix
                relative = PurePosixPath(key).name
            else:
                relative = key[len(root) :]
        else:
            relative = Path(info.uri).relative_to(root).as_posix() if Path(info.uri) != src_loc else src_loc.name
        parts = PurePosixPath(relative).parts
        if dst_is_local and (not parts or ".." in parts or relative.startswith("/") or "\x00" in relative):
            raise StorageError(info.uri, "refusing to copy a key that would leave the destination directory")
        plan.append((info.uri, join(dst, relative), info.size))
    return plan
