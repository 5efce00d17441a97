"""Optional MLflow tracking from rank 0: params, metrics, tags and plots go to an MLflow tracking server, and a
server that is down or slow never stops or slows training.

Every public call only queues and returns. The queue is bounded (``MAX_QUEUED_POINTS`` metric points; when it is
full the oldest points are dropped and counted); one daemon thread talks to the server with ``MlflowClient``,
retrying with a capped backoff, and ``close`` waits for it a bounded time. The run id, kept in every checkpoint by
the caller, lets a resumed or preempted job continue the same MLflow run; a job whose checkpoint does not name
one (killed before a checkpoint recorded it) continues its run folder's unfinished run, found by a tag. The steps
it redoes are not logged twice (per metric key, points at or below the highest step already logged are
dropped). ``mlflow`` is imported by that thread only, so tracking costs nothing when it is off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
import posixpath
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from trainer.config import MlflowConfig
from trainer.logs import rank_from_env

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("trainer.tracking")

MAX_QUEUED_POINTS = 10_000
MAX_QUEUED_ARTIFACT_BYTES = 64 << 20  # plots are redrawn whole: a newer copy of a path replaces the queued one
# MLflow's limits: per log_batch request, and on key and value lengths.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
TAGS_PER_BATCH = 100
MAX_KEY_CHARS = 250
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000  # 8000 on recent servers; older ones accept 5000
MAX_HISTORY_KEYS = 1000  # metric keys whose history a resumed run reads (the trainer logs a few dozen)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0
# MLflow's own client knobs, set for this process when tracking starts unless the user set them: MLflow's
# defaults (a 120 s timeout, 7 retries with exponential backoff) can block a request for minutes.
CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # the worker retries itself, with a capped backoff
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the run's address goes to the log instead
    "MLFLOW_DISABLE_TELEMETRY": "true",  # a training job sends no usage reports to a third party
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's lines go through trainer.logs: one format, the rank tag
}
FINISHED, FAILED, KILLED, PREEMPTED = "FINISHED", "FAILED", "KILLED", "PREEMPTED"
STATUSES = (FINISHED, FAILED, KILLED, PREEMPTED)
RUN_URI_TAG, STATE_TAG = "trainer.run_uri", "trainer.state"
RUN_KEY_TAG = "trainer.run_key"  # a hash of the run folder: a search-safe, untruncated stand-in for RUN_URI_TAG
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\- /]")
_INSTALL_HINT = "pip install 'detection-trainer[mlflow]'"


# ------------------------------------------------------------------------------------------ pure helpers
@functools.lru_cache(maxsize=4096)  # metric names repeat every step
def safe_key(key: object) -> str | None:
    """``key`` as MLflow accepts it (its characters, length and no path tricks such as ``a/../b``), or None.

    Config keys pass unchanged; a user-named ``model.options`` entry with odd characters gets ``_`` for them.
    """
    if not isinstance(key, str) or not key.strip():
        return None
    text = _BAD_KEY_CHARS.sub("_", key.strip())[:MAX_KEY_CHARS]
    if posixpath.normpath(text) != text or text.startswith(("..", "/")) or text == ".":
        text = "_" + text.replace("/", "_")
    return text


def _param_value(value: Any) -> str:
    """Strings as they are, everything else as JSON (``true``, ``null``, ``[16, 22]``), cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    cut = "...(truncated)"
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - len(cut)] + cut


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (``optim.lr``), string values within MLflow's limits.

    Nested mappings become dotted keys; an empty mapping stays one param (``model.options: {}``), so every
    config key is visible in the run.
    """
    flat: dict[str, str] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{dotted}."))
            continue
        key = safe_key(dotted)
        if key is not None:
            flat[key] = _param_value(value)
    return flat


def metric_value(value: object) -> float | None:
    """A finite float, or None for what MLflow should not get (NaN, inf, booleans, tensors, text)."""
    plain = type(value) is float or type(value) is int  # the common cases first: this runs per point
    if not plain and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return None
    number = float(value)  # type: ignore[arg-type]  # a numbers.Real
    return number if math.isfinite(number) else None


def _is_step(step: object) -> bool:
    """A whole number >= 0 (an int, or numpy's; not a bool)."""
    whole = type(step) is int or (isinstance(step, numbers.Integral) and not isinstance(step, bool))
    return whole and int(step) >= 0  # type: ignore[call-overload]  # a numbers.Integral


def artifact_path(path_in_run: str) -> PurePosixPath | None:
    """A relative path inside the run's artifacts (``plots/loss.png``), or None for one that would leave it."""
    if not isinstance(path_in_run, str) or not path_in_run.strip() or path_in_run.endswith("/"):
        return None
    path = PurePosixPath(path_in_run)
    if path.is_absolute() or ".." in path.parts or not path.name or "\\" in path_in_run:
        return None
    return path


def run_key(run_uri: str) -> str:
    """The run folder as a tag value any search filter can quote (a URI may hold quotes; tags are truncated)."""
    return hashlib.sha256(run_uri.encode()).hexdigest()[:32]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _apply_client_env_defaults() -> None:
    for name, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


# ------------------------------------------------------------------------------------------ the trackers
class Tracker(Protocol):
    """What the training loop calls; ``NullTracker`` when tracking is off or on ranks other than 0."""

    @property
    def run_id(self) -> str | None: ...
    def start(self, run_id: str | None, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, object]) -> None: ...
    def log_artifact_bytes(self, path_in_run: str, data: bytes) -> None: ...
    def finish(self, status: str) -> None: ...
    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None: ...


class NullTracker:
    """Tracking off: every call does nothing (the loop calls the same methods either way)."""

    run_id: str | None = None

    def start(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, object]) -> None:
        pass

    def log_artifact_bytes(self, path_in_run: str, data: bytes) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        pass


def open_tracker(config: MlflowConfig, run_uri: str, default_run_name: str, rank: int | None = None) -> Tracker:
    """An ``MlflowTracker`` on rank 0 (or a single process) when ``log.mlflow.tracking_uri`` is set, else a
    ``NullTracker``: one run per training job, written by one process. ``rank`` defaults to torchrun's RANK.

    A resumed rank 0 passes the checkpoint's run id to ``start`` (None when the checkpoint has none), so the
    run id survives even when this job's rank 0 runs on another pod.
    """
    rank = rank_from_env() if rank is None else rank
    if not config.tracking_uri or rank not in (None, 0):
        return NullTracker()
    return MlflowTracker(config, run_uri, default_run_name)


class _Point(NamedTuple):
    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass
class _Start:
    run_id: str | None
    params: dict[str, str]


@dataclass
class _Counters:
    """Trouble seen so far, reported in one warning each time a kind first appears and summed up at close."""

    dropped_points: int = 0  # queue full (server slow or down)
    rejected_points: int = 0  # refused by the server (a 4xx): retrying cannot help
    skipped_values: int = 0  # non-finite or not numbers
    repeated_steps: int = 0  # at or below the highest step already logged for their key (a resume's redone steps)
    dropped_artifacts: int = 0
    warned: set[str] = field(default_factory=set)


class MlflowTracker:
    """One MLflow run, written from rank 0 through a bounded queue and a daemon thread (see the module doc).

    ``run_id`` is None until the thread has created or attached the run; the caller stores it in each checkpoint.
    Per metric key, steps must rise: a point at or below the key's last logged step is dropped, which is what
    keeps a resumed run's redone steps from being logged twice.
    """

    def __init__(self, config: MlflowConfig, run_uri: str, default_run_name: str, *,
                 max_points: int = MAX_QUEUED_POINTS, max_artifact_bytes: int = MAX_QUEUED_ARTIFACT_BYTES) -> None:
        if not config.tracking_uri:
            raise ValueError("MlflowTracker needs log.mlflow.tracking_uri (open_tracker returns a NullTracker)")
        self.config = config
        self.run_uri = run_uri
        self.run_name = config.run_name or default_run_name
        self.max_points = max_points
        self.max_artifact_bytes = max_artifact_bytes
        self.counters = _Counters()
        self._cond = threading.Condition()
        self._points: deque[_Point] = deque()
        self._tags: dict[str, str] = {}
        self._artifacts: dict[str, bytes] = {}  # insertion order is age
        self._start: _Start | None = None
        self._status: str | None = None
        self._closing_deadline: float | None = None
        self._run_id: str | None = None
        self._thread: threading.Thread | None = None
        self._done = False  # the worker has stopped (finished, gave up, or tracking could not start)

    # -------------------------------------------------------------------------------- the caller's side
    @property
    def run_id(self) -> str | None:
        with self._cond:
            return self._run_id

    def start(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Create a run (``run_id`` None) or attach to the checkpoint's; ``params`` is the resolved config
        (nested or flat). A resumed run logs only the params it lacks: MLflow params cannot change."""
        with self._cond:
            if self._start is not None or self._closing_deadline is not None:
                self._warn_once("start-twice", "MLflow tracking: start() called again; ignored")
                return
            self._start = _Start(run_id, flatten_params(params))
        _apply_client_env_defaults()
        self._thread = threading.Thread(target=_Worker(self).run, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: Mapping[str, object], step: int) -> None:
        """Queue one point per finite number (NaN, inf and non-numbers are skipped)."""
        if not _is_step(step):
            self._warn_once("step", f"MLflow tracking: step {step!r} is not a whole number >= 0; not logged")
            return
        now = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            number, name = metric_value(value), safe_key(key)
            if number is None or name is None:
                self.counters.skipped_values += 1
                continue
            points.append(_Point(name, number, int(step), now))
        if points and not self._done:
            with self._cond:
                was_empty = not self._points
                self._queue_points(points)
                if was_empty:  # else the worker is busy or backing off: waking it per call costs the loop
                    self._cond.notify()

    def set_tags(self, tags: Mapping[str, object]) -> None:
        if self._done:
            return
        with self._cond:
            for key, value in tags.items():
                name = safe_key(key)
                if name is not None:
                    self._tags[name] = str(value)[:MAX_TAG_CHARS]
            self._cond.notify()

    def log_artifact_bytes(self, path_in_run: str, data: bytes) -> None:
        """Queue a file for the run's artifacts (e.g. ``plots/loss.png``); a newer copy replaces a queued one."""
        path = artifact_path(path_in_run)
        if path is None:
            self._warn_once("artifact-path", f"MLflow tracking: artifact path {path_in_run!r} is not a file path "
                                             "inside the run; not logged")
            return
        if self._done:
            return
        with self._cond:
            self._artifacts.pop(str(path), None)
            self._artifacts[str(path)] = bytes(data)
            while sum(map(len, self._artifacts.values())) > self.max_artifact_bytes and len(self._artifacts) > 1:
                del self._artifacts[next(iter(self._artifacts))]
                self.counters.dropped_artifacts += 1
                self._warn_once("artifact-overflow", "MLflow tracking: artifacts queue up faster than the server "
                                                     "takes them; the oldest are dropped")
            self._cond.notify()

    def finish(self, status: str = FINISHED) -> None:
        """End the run: FINISHED at the normal end, FAILED on a crash. PREEMPTED leaves it RUNNING, tagged
        ``trainer.state=preempted``: the resumed job continues it, and the experiment shows no failure."""
        status = str(status).upper()
        if status not in STATUSES:
            self._warn_once("status", f"MLflow tracking: unknown status {status!r}; using FAILED")
            status = FAILED
        with self._cond:
            if self._status is None:
                self._status = status
                self._tags[STATE_TAG] = status.lower()
            self._cond.notify()

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Send what is queued for at most ``timeout`` seconds, then give up with a warning; never raises.
        A second call does nothing."""
        with self._cond:
            if self._closing_deadline is not None:
                return
            self._closing_deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, timeout) + 0.2)
        with self._cond:
            points, artifacts = len(self._points), len(self._artifacts)
            self._done = True
        if self._thread is not None and self._thread.is_alive():
            log.warning("MLflow tracking: gave up after %.1f s with %d metric points and %d artifacts not sent "
                        "(%s is slow or unreachable)", timeout, points, artifacts, self.config.tracking_uri)
        elif points or artifacts:
            log.warning("MLflow tracking: %d metric points and %d artifacts not sent", points, artifacts)
        self._report_losses()

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- shared, under the lock
    def _queue_points(self, points: list[_Point], front: bool = False) -> None:
        """Add points (at the front: a batch that failed and is retried), dropping the oldest past the bound."""
        if front:
            self._points.extendleft(reversed(points))
        else:
            self._points.extend(points)
        excess = len(self._points) - self.max_points
        if excess > 0:
            for _ in range(excess):
                self._points.popleft()
            self.counters.dropped_points += excess
            self._warn_once("overflow", "MLflow tracking: more than %d metric points waiting for %s; the oldest "
                                        "are dropped (counted at the end)", self.max_points, self.config.tracking_uri)

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.counters.warned:
            self.counters.warned.add(kind)
            log.warning(message, *args)

    def _report_losses(self) -> None:
        c = self.counters
        if c.dropped_points or c.rejected_points or c.dropped_artifacts:
            log.warning("MLflow tracking: %d metric points dropped (queue full), %d rejected by the server, "
                        "%d artifacts dropped", c.dropped_points, c.rejected_points, c.dropped_artifacts)
        if c.skipped_values or c.repeated_steps:
            log.info("MLflow tracking: %d non-finite or non-numeric values skipped, %d points of steps already "
                     "logged not sent again", c.skipped_values, c.repeated_steps)


class _Trouble(Exception):
    """A failure of one request: ``permanent`` when retrying cannot help (the server refused it with a 4xx)."""

    def __init__(self, what: str, cause: BaseException, permanent: bool) -> None:
        super().__init__(f"{what}: {type(cause).__name__}: {str(cause)[:300]}")
        self.permanent = permanent


def _is_permanent(exc: BaseException) -> bool:
    """MLflow's 4xx answers (bad value, no such run) are permanent; connection errors, timeouts, 429 and 5xx pass."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return not isinstance(exc, OSError | TimeoutError)


class _Worker:
    """The daemon thread: imports mlflow, creates or attaches the run, then sends what the caller queues."""

    def __init__(self, tracker: MlflowTracker) -> None:
        self.t = tracker
        self.client: MlflowClient | None = None
        self.last_step: dict[str, int] = {}  # per key, the highest step logged (by any process, for this run)
        self.pending_params: list[tuple[str, str]] = []
        self.backoff = 0.0
        self.failed_at = 0.0
        self.was_down = False

    def run(self) -> None:
        try:
            self._serve()
        except Exception as exc:  # a bug here must not reach training: stop tracking, say why
            log.warning("MLflow tracking stopped: %s: %s", type(exc).__name__, exc)
        finally:
            with self.t._cond:
                self.t._done = True
                self.t._cond.notify_all()

    def _serve(self) -> None:
        if not self._connect():
            return
        while True:
            with self.t._cond:
                if not self._wait_for_work():
                    return
            try:
                if self._step():
                    return
                self._recovered()
            except _Trouble as trouble:
                if trouble.permanent and self.t.run_id is None:
                    log.warning("MLflow tracking off: %s", trouble)
                    return
                self._failed(trouble)

    def _connect(self) -> bool:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            log.warning("MLflow tracking off: mlflow cannot be imported (%s); %s", exc, _INSTALL_HINT)
            return False
        try:
            self.client = MlflowClient(tracking_uri=self.t.config.tracking_uri)
        except Exception as exc:
            log.warning("MLflow tracking off: %s: %s", self.t.config.tracking_uri, exc)
            return False
        return True

    def _wait_for_work(self) -> bool:
        """Under the lock: wait until there is work and the backoff has passed; False when the worker should
        stop (closing with nothing left, or past the close deadline). Closing shortens the backoff, so a server
        that is back gets what is queued."""
        t = self.t
        while True:
            now, deadline = time.monotonic(), t._closing_deadline
            if deadline is not None and now >= deadline:
                return False
            retry_at = self.failed_at + (self.backoff if deadline is None else min(self.backoff, BACKOFF_FIRST_S))
            pending = (t._run_id is None or bool(t._points or t._tags or t._artifacts or self.pending_params)
                       or t._status is not None)
            if pending and now >= retry_at:
                return True
            if not pending and deadline is not None:
                return False
            waits = [x - now for x in (retry_at if pending else None, deadline) if x is not None]
            t._cond.wait(timeout=max(0.01, min(waits)) if waits else None)

    def _failed(self, trouble: _Trouble) -> None:
        if trouble.permanent:
            what = str(trouble).split(":")[0]
            self.t._warn_once(f"rejected:{what}", "MLflow tracking: the server refused %s (not retried)", trouble)
            return
        self.was_down = True
        self.failed_at = time.monotonic()
        self.backoff = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self.backoff * 2))
        self.t._warn_once("unreachable", "MLflow tracking: %s failed (%s); retrying in the background, training "
                          "goes on", self.t.config.tracking_uri, trouble)

    def _recovered(self) -> None:
        if self.was_down:
            log.info("MLflow tracking: %s answers again", self.t.config.tracking_uri)
            self.was_down = False
        self.backoff = 0.0

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise _Trouble(what, exc, _is_permanent(exc)) from exc

    # -------------------------------------------------------------------------------------------- one step
    def _step(self) -> bool:
        """Send one piece of queued work, oldest kind first; True once the run is finished (nothing more to do)."""
        if self.t.run_id is None:
            self._open_run()
            return False
        if self._send_params():
            return False
        with self.t._cond:
            tags, self.t._tags = self.t._tags, {}
        if tags:
            self._send_or_requeue_tags(tags)
            return False
        if self._send_points() or self._send_one_artifact():
            return False
        with self.t._cond:
            status = self.t._status
        if status is None:
            return False
        if status != PREEMPTED:
            run_id = self._run()
            try:
                self._call("ending the run", lambda: self._client().set_terminated(run_id, status))
            except _Trouble as trouble:
                if not trouble.permanent:
                    raise
                log.warning("MLflow tracking: the server refused %s", trouble)
                return True
        log.info("MLflow run %s: %s", self.t.run_id, status.lower())
        return True

    def _client(self) -> MlflowClient:
        assert self.client is not None
        return self.client

    def _send_or_requeue_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = list(tags.items())
        try:
            for chunk in _chunks(items, TAGS_PER_BATCH):
                batch = [RunTag(k, v) for k, v in chunk]
                self._call("logging tags", functools.partial(self._client().log_batch, self._run(), tags=batch))
        except _Trouble as trouble:
            if not trouble.permanent:
                with self.t._cond:  # newer values set meanwhile win
                    self.t._tags = {**tags, **self.t._tags}
            raise

    def _run(self) -> str:
        run_id = self.t.run_id
        assert run_id is not None
        return run_id

    def _send_points(self) -> bool:
        """Send up to one batch of metric points; False when none are queued."""
        from mlflow.entities import Metric

        with self.t._cond:
            if not self.t._points:
                return False
            batch = [self.t._points.popleft() for _ in range(min(METRICS_PER_BATCH, len(self.t._points)))]
        fresh, last = [], dict(self.last_step)
        for point in batch:
            if point.step <= last.get(point.key, -1):
                self.t.counters.repeated_steps += 1
                continue
            last[point.key] = point.step
            fresh.append(point)
        try:
            if fresh:
                self._call("logging metrics", lambda: self._client().log_batch(self._run(), metrics=[
                    Metric(p.key, p.value, p.timestamp_ms, p.step) for p in fresh]))
        except _Trouble as trouble:
            if trouble.permanent:
                self.t.counters.rejected_points += len(fresh)
            else:
                with self.t._cond:
                    self.t._queue_points(fresh, front=True)
            raise
        self.last_step = last
        return True

    def _send_one_artifact(self) -> bool:
        with self.t._cond:
            if not self.t._artifacts:
                return False
            path = next(iter(self.t._artifacts))
            data = self.t._artifacts.pop(path)
        target = PurePosixPath(path)
        try:
            with tempfile.TemporaryDirectory(prefix="trainer-mlflow-") as folder:
                local = Path(folder) / target.name
                local.write_bytes(data)
                parent = str(target.parent) if str(target.parent) != "." else None
                self._call(f"logging artifact {path}",
                           lambda: self._client().log_artifact(self._run(), str(local), parent))
        except _Trouble as trouble:
            if not trouble.permanent:
                with self.t._cond:  # back at the front, unless a newer copy was queued meanwhile
                    self.t._artifacts = {path: data, **self.t._artifacts} if path not in self.t._artifacts \
                        else self.t._artifacts
            raise
        return True

    # ------------------------------------------------------------------------------------- opening the run
    def _open_run(self) -> None:
        """Attach to the checkpoint's run, or create one; the params then wait in ``pending_params``."""
        with self.t._cond:
            start = self.t._start
        assert start is not None
        opened = self._attach(start) if start.run_id else None
        if opened is None:
            experiment_id = self._experiment_id()
            unfinished = self._unfinished_run(experiment_id)
            if unfinished is not None:
                log.info("MLflow tracking: continuing run %s of this run folder (the checkpoint did not name it)",
                         unfinished)
                opened = self._attach(_Start(unfinished, start.params))
            if opened is None:
                opened = self._create(start, experiment_id)
        run_id, experiment_id = opened
        with self.t._cond:
            self.t._run_id = run_id
        uri = str(self.t.config.tracking_uri)
        where = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else uri
        log.info("MLflow run %s in experiment %r: %s", run_id, self.t.config.experiment, where)

    def _experiment_id(self) -> str:
        name = self.t.config.experiment
        client = self._client()
        experiment = self._call("finding the experiment", lambda: client.get_experiment_by_name(name))
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise _Trouble("finding the experiment", RuntimeError(
                    f"experiment {name!r} is deleted; restore it or set another log.mlflow.experiment"), True)
            return str(experiment.experiment_id)
        try:
            return str(self._call("creating the experiment", lambda: client.create_experiment(name)))
        except _Trouble:
            again = self._call("finding the experiment", lambda: client.get_experiment_by_name(name))
            if again is None:  # not a race with another job creating it: the original error stands
                raise
            return str(again.experiment_id)

    def _unfinished_run(self, experiment_id: str) -> str | None:
        """The newest run of this run folder that never ended, or None. A restart whose checkpoint does not name
        its run continues this one instead of opening a second: the job was killed after the run was created but
        before a checkpoint recorded its id, or a create whose answer was lost (a timeout) is being retried."""
        key = run_key(self.t.run_uri)
        try:
            runs = self._call("finding the run", lambda: self._client().search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'",
                max_results=1, order_by=["attributes.start_time DESC"]))
        except _Trouble as trouble:
            if not trouble.permanent:
                raise
            self.t._warn_once("search", "MLflow tracking: the server refused %s; a new run is created", trouble)
            return None
        return str(runs[0].info.run_id) if runs else None

    def _create(self, start: _Start, experiment_id: str) -> tuple[str, str]:
        """A new run, tagged with the trainer's run folder (its URI, and its key for ``_unfinished_run``)."""
        tags = {RUN_URI_TAG: self.t.run_uri[:MAX_TAG_CHARS], RUN_KEY_TAG: run_key(self.t.run_uri),
                STATE_TAG: "running"}
        if start.run_id:
            tags["trainer.previous_run_id"] = start.run_id
        run = self._call("creating the run", lambda: self._client().create_run(
            experiment_id, run_name=self.t.run_name, tags=tags))
        self.pending_params = list(start.params.items())
        return str(run.info.run_id), experiment_id

    def _attach(self, start: _Start) -> tuple[str, str] | None:
        """Continue the checkpoint's run: RUNNING again, each key's last step (so the redone steps are not
        logged twice), and the params it lacks. None when the run is gone: a new one is created instead."""
        assert start.run_id is not None
        run_id, client = start.run_id, self._client()
        try:
            run = self._call("reading the run", lambda: client.get_run(run_id))
        except _Trouble as trouble:
            if not trouble.permanent:
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow tracking: run %s (from the checkpoint) is not on %s; a new run is created",
                        run_id, self.t.config.tracking_uri)
            return None
        self.last_step = self._last_steps(run_id, list(run.data.metrics))
        logged = run.data.params
        changed = sorted(k for k, v in start.params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("MLflow tracking: %d settings differ from the run's params, which cannot change: %s",
                        len(changed), ", ".join(changed[:10]))
        self._call("resuming the run", lambda: client.update_run(run_id, status="RUNNING"))
        self._call("tagging the run", lambda: client.set_tag(run_id, STATE_TAG, "running"))
        self.pending_params = [(k, v) for k, v in start.params.items() if k not in logged]
        return run_id, str(run.info.experiment_id)

    def _last_steps(self, run_id: str, keys: list[str]) -> dict[str, int]:
        """Per metric key, the highest step the run already has (one bounded history request per key)."""
        last: dict[str, int] = {}
        if len(keys) > MAX_HISTORY_KEYS:
            self.t._warn_once("history", f"MLflow tracking: the run has {len(keys)} metric keys; only the first "
                                         f"{MAX_HISTORY_KEYS} are checked for steps already logged")
        for key in sorted(keys)[:MAX_HISTORY_KEYS]:
            history = self._call("reading the metric history",
                                 functools.partial(self._client().get_metric_history, run_id, key))
            if history:
                last[key] = max(int(m.step) for m in history)
        return last

    def _send_params(self) -> bool:
        """Send one batch of the params still to log; False when none are left."""
        from mlflow.entities import Param

        if not self.pending_params:
            return False
        chunk = self.pending_params[:PARAMS_PER_BATCH]
        try:
            self._call("logging params", lambda: self._client().log_batch(
                self._run(), params=[Param(k, v) for k, v in chunk]))
        except _Trouble as trouble:
            if trouble.permanent:
                del self.pending_params[:PARAMS_PER_BATCH]
            raise
        del self.pending_params[:PARAMS_PER_BATCH]
        return True
