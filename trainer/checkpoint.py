"""Checkpoints under ``<run>/checkpoints/`` (local or S3) with the commit protocol of DESIGN.md.

A checkpoint is a folder ``step-<N>/`` of payload objects (torch files and a JSON state), then a
``manifest.json`` with each object's size and sha256, then ``checkpoints/latest.json`` naming the folder (one
small PUT). A crash anywhere before that last PUT leaves the previous checkpoint as latest; a reader verifies the
checksums and falls back to the newest checkpoint that verifies. Retention deletes old folders only after a newer
commit, and never the best one.

Saving is split in two so training stalls only for a copy to CPU memory: ``snapshot`` (synchronous, every rank
agrees on the step before calling it) and the upload, in a background thread (``CheckpointWriter``). Only rank 0
writes. Every load uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain containers, and
nothing in it can run code. Torch is imported only where tensors are touched, so a starting process can fetch and
verify the checkpoint it resumes from while torch is still being imported (``prefetch_latest``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trainer import storage
from trainer.errors import InputError
from trainer.progress import format_checkpoint

log = logging.getLogger(__name__)

FORMAT = "detection-trainer/checkpoint-1"
LATEST = "latest.json"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{9})")


class CheckpointError(InputError):
    """A checkpoint that cannot be used: missing, partial, corrupt or not a checkpoint of ours."""


# Raises CheckpointError when a loaded checkpoint lacks what its user needs (resume, export).
CheckpointCheck = Callable[["LoadedCheckpoint"], None]


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"  # zero-padded: listing order is step order


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


# ------------------------------------------------------------------------------------------ snapshot
def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU memory: training may change the originals right after."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(value) for value in obj)
    return obj


@dataclass
class Snapshot:
    """Everything one checkpoint holds, already copied to CPU memory.

    ``objects``: name → object saved with ``torch.save`` as ``<name>.pt``; ``state``: JSON-able training state
    (step, epoch, data position, config...) saved as ``state.json``; ``metric``: the eval metric at this point
    (decides the best checkpoint), or None before any evaluation.
    """

    step: int
    epoch: int
    objects: dict[str, Any]
    state: dict[str, Any]
    metric: float | None = None

    def payload(self) -> dict[str, bytes]:
        import torch

        files = {}
        for name, obj in self.objects.items():
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            files[f"{name}.pt"] = buffer.getvalue()
        files["state.json"] = json.dumps(self.state, indent=1, sort_keys=True).encode()
        return files


# ------------------------------------------------------------------------------------------ writing
@dataclass
class CommitResult:
    step: int
    uri: str
    bytes: int
    seconds: float  # serialising, hashing, uploading, committing
    upload_seconds: float  # the part after serialising


class CheckpointWriter:
    """Uploads snapshots in one background thread, commits them, applies retention.

    ``submit`` first waits for the previous upload (at most one in flight, so memory holds at most two
    snapshots); a failed upload is retried ``attempts`` times, then logged loudly and the run goes on (the next
    save tries again). ``wait`` blocks until the upload in flight is committed (or failed) and says which.
    """

    def __init__(self, run_uri: str, keep_last: int = 3, attempts: int = 3, retry_wait_s: float = 2.0,
                 fence: Callable[[], None] | None = None) -> None:
        self.root = checkpoints_uri(run_uri)
        self.fence = fence or (lambda: None)  # raises when this job may no longer write the run (its lease)
        self.keep_last = keep_last
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._future: Future[CommitResult | None] | None = None
        self._lock = threading.Lock()
        self.metrics: dict[int, float | None] = {c.step: c.metric for c in list_checkpoints(self.root)
                                                 if c.committed}
        self.last_committed: CommitResult | None = None
        self.failures = 0

    def submit(self, snapshot: Snapshot) -> None:
        self.wait()
        self._future = self._pool.submit(self._upload_with_retries, snapshot)

    def wait(self) -> CommitResult | None:
        """Block until the upload in flight ends; the commit, or None if it failed (or nothing was in flight)."""
        future, self._future = self._future, None
        return future.result() if future is not None else None

    def close(self) -> CommitResult | None:
        result = self.wait()
        self._pool.shutdown(wait=True)
        return result

    def _upload_with_retries(self, snapshot: Snapshot) -> CommitResult | None:
        for attempt in range(1, self.attempts + 1):
            try:
                result = self.commit(snapshot)
            except (storage.StorageError, OSError) as exc:
                if attempt == self.attempts:
                    self.failures += 1
                    log.error("CHECKPOINT NOT SAVED: step %d failed after %d attempts (%s); training goes on and "
                              "the next checkpoint will try again; the latest good one is still %s", snapshot.step,
                              attempt, exc, self.last_committed.uri if self.last_committed else "none")
                    return None
                log.warning("checkpoint step %d: upload attempt %d failed (%s); retrying", snapshot.step, attempt,
                            exc)
                time.sleep(self.retry_wait_s * attempt)
            else:
                return result
        return None

    def commit(self, snapshot: Snapshot) -> CommitResult:
        """Steps 2-4 of the protocol for one snapshot (called in the upload thread, or directly)."""
        started = time.perf_counter()
        folder = storage.join(self.root, step_dir_name(snapshot.step))
        files = snapshot.payload()
        serialised = time.perf_counter()

        def upload(name: str) -> str:
            storage.write_bytes(storage.join(folder, name), files[name])
            return hashlib.sha256(files[name]).hexdigest()  # hashing releases the GIL: overlaps other uploads

        with ThreadPoolExecutor(len(files)) as pool:  # every object at once: small ones go up beside the big one
            digests = dict(zip(files, pool.map(upload, files), strict=True))
        manifest = {"format": FORMAT, "step": snapshot.step, "epoch": snapshot.epoch, "metric": snapshot.metric,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "files": {name: {"size": len(data), "sha256": digests[name]} for name, data in files.items()}}
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        storage.write_bytes(storage.join(folder, MANIFEST), manifest_bytes)
        self.fence()
        storage.write_text(storage.join(self.root, LATEST), json.dumps(
            {"step": snapshot.step, "dir": step_dir_name(snapshot.step),
             "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}) + "\n")
        size = sum(len(data) for data in files.values()) + len(manifest_bytes)
        result = CommitResult(snapshot.step, folder, size, time.perf_counter() - started,
                              time.perf_counter() - serialised)
        with self._lock:
            self.metrics[snapshot.step] = snapshot.metric
            self.last_committed = result
        log.info("%s", format_checkpoint(folder, size / 1e6, result.seconds))
        self._retain(snapshot.step)
        return result

    def _retain(self, latest: int) -> None:
        """Delete folders other than the newest ``keep_last`` and the best; also debris of failed uploads."""
        keep = set(sorted(self.metrics)[-self.keep_last:])
        scored = [(metric, step) for step, metric in self.metrics.items() if metric is not None]
        if scored:
            keep.add(max(scored)[1])
        for info in list_checkpoints(self.root):
            if info.step in keep or info.step >= latest:
                continue
            self.fence()
            try:
                storage.delete_prefix(storage.join(self.root, step_dir_name(info.step)))
                self.metrics.pop(info.step, None)
                log.info("retention: deleted checkpoint step %d%s", info.step,
                         "" if info.committed else " (an upload that never completed)")
            except storage.StorageError as exc:
                log.warning("retention: could not delete checkpoint step %d: %s", info.step, exc)


# ------------------------------------------------------------------------------------------ reading
@dataclass
class CheckpointInfo:
    step: int
    uri: str
    committed: bool  # has a valid manifest
    metric: float | None = None
    epoch: int | None = None
    size: int = 0
    created: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None  # why a folder with a manifest is unusable (CORRUPT)


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every ``step-<N>/`` folder under a checkpoints folder, oldest first, with its manifest when it has one."""
    steps: dict[int, list[str]] = {}
    for info in storage.list_objects(root, recursive=True) if storage.is_dir(root) else []:
        relative = info.uri[len(root.rstrip("/")) + 1:]
        match = STEP_DIR.fullmatch(relative.split("/", 1)[0])
        if match and not info.is_dir:
            steps.setdefault(int(match.group(1)), []).append(relative.split("/", 1)[-1])
    found = []
    for step in sorted(steps):
        uri = storage.join(root, step_dir_name(step))
        item = CheckpointInfo(step, uri, MANIFEST in steps[step])
        if item.committed:
            try:
                manifest = read_manifest(uri)
            except CheckpointError as exc:
                log.warning("%s", exc)
                item.committed, item.problem = False, str(exc)
            else:
                item.metric, item.epoch = manifest["metric"], manifest["epoch"]
                item.files, item.created = manifest["files"], manifest.get("created")
                item.size = sum(f["size"] for f in item.files.values())
        found.append(item)
    return found


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of a checkpoint folder, every field checked: a damaged one is a CheckpointError, never a
    KeyError or TypeError later."""
    uri = storage.join(folder, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except storage.NotFound as exc:
        raise CheckpointError(f"{folder}: no {MANIFEST} (an upload that never completed)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{uri}: not a detection-trainer checkpoint manifest")
    problem = _manifest_problem(manifest, storage.basename(folder))
    if problem:
        raise CheckpointError(f"{uri}: damaged manifest: {problem}")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: dict[str, Any], folder_name: str) -> str | None:
    """What is wrong with a manifest's fields, or None."""
    step, epoch, metric, files = (manifest.get(k) for k in ("step", "epoch", "metric", "files"))
    if not _is_int(step):
        return f"'step' is {step!r}, not a step number"
    if STEP_DIR.fullmatch(folder_name) and int(folder_name[5:]) != step:
        return f"'step' {step} does not match the folder {folder_name}"
    if not _is_int(epoch):
        return f"'epoch' is {epoch!r}, not an epoch number"
    if metric is not None and not (isinstance(metric, int | float) and not isinstance(metric, bool)
                                   and math.isfinite(metric)):
        return f"'metric' is {metric!r}, not a finite number"
    if not isinstance(files, dict) or "state.json" not in files:
        return "'files' does not list state.json"
    for name, entry in files.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or not isinstance(entry, dict):
            return f"invalid file entry {name!r}"
        if not _is_int(entry.get("size")):
            return f"{name}: 'size' is {entry.get('size')!r}"
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"{name}: 'sha256' is {entry.get('sha256')!r}"
    return None


@dataclass
class LoadedCheckpoint:
    uri: str
    step: int
    epoch: int
    state: dict[str, Any]
    objects: dict[str, Any]
    metric: float | None


@dataclass
class Prefetched:
    """A checkpoint folder's manifest and payload bytes, downloaded and verified before torch is even imported
    (a resumed process overlaps its largest download with its slowest import)."""

    uri: str
    manifest: dict[str, Any]
    files: dict[str, bytes]


def fetch_verified(folder: str) -> Prefetched:
    """Download every object of a checkpoint folder and check it against the manifest (size and sha256)."""
    manifest = read_manifest(folder)

    def fetch(item: tuple[str, dict[str, Any]]) -> bytes:
        name, entry = item
        uri = storage.join(folder, name)
        try:
            data = storage.read_bytes(uri, size_hint=entry["size"])
        except storage.NotFound as exc:
            raise CheckpointError(f"{uri}: listed in the manifest but missing") from exc
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{uri}: size or sha256 differs from the manifest (corrupt or partial)")
        return data

    items = sorted(manifest["files"].items())
    with ThreadPoolExecutor(max(1, len(items))) as pool:  # all objects at once, each verified as it arrives
        contents = list(pool.map(fetch, items))
    return Prefetched(folder, manifest, {name: data for (name, _), data in zip(items, contents, strict=True)})


class LatestPrefetch:
    """Fetches and verifies the checkpoint ``latest.json`` names, in a background thread; ``take`` hands the bytes
    over once (so nothing keeps them alive after the resume). Needs no torch. Any problem (no checkpoint, damage)
    leaves None: the resume lookup then reports it and falls back as usual."""

    def __init__(self, root: str) -> None:
        self._result: Prefetched | None = None
        self._thread = threading.Thread(target=self._fetch, args=(root,), name="resume-prefetch", daemon=True)
        self._thread.start()

    def _fetch(self, root: str) -> None:
        try:
            folder = read_latest(root)
            self._result = fetch_verified(folder) if folder is not None else None
        except (CheckpointError, storage.StorageError) as exc:
            log.debug("prefetch of %s skipped: %s", root, exc)

    def take(self) -> Prefetched | None:
        self._thread.join()
        result, self._result = self._result, None
        return result


def load_checkpoint(folder: str, names: tuple[str, ...] | None = None,
                    prefetched: Prefetched | None = None) -> LoadedCheckpoint:
    """Read and verify one checkpoint folder (sizes and sha256 of every payload object), then load it safely.

    ``names`` limits which ``.pt`` objects are loaded (e.g. only ``model`` for an export); all are verified.
    ``prefetched`` holds the folder's verified bytes when they were fetched ahead.
    """
    import torch

    fetched = prefetched if prefetched is not None and prefetched.uri == folder else fetch_verified(folder)
    manifest = fetched.manifest
    loaded: dict[str, Any] = {}
    state: dict[str, Any] | None = None
    for name, data in fetched.files.items():
        uri = storage.join(folder, name)
        if name == "state.json":
            try:
                state = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{uri}: not valid JSON ({exc})") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{uri}: holds a JSON {type(state).__name__}, not an object")
        elif name.endswith(".pt") and (names is None or name[:-3] in names):
            try:
                with warnings.catch_warnings():  # torch warns about plain pickles before it refuses them
                    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                    loaded[name[:-3]] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:  # anything torch.load refuses is unusable, whatever the reason
                raise CheckpointError(f"{uri}: refused by torch.load(weights_only=True): "
                                      f"{str(exc).splitlines()[0][:200]}") from exc
    assert state is not None  # the manifest check requires state.json
    return LoadedCheckpoint(folder, manifest["step"], manifest["epoch"], state, loaded, manifest["metric"])


def read_latest(root: str) -> str | None:
    """The folder ``latest.json`` names, or None when there is none. It may only name a ``step-<N>`` folder
    beside it: a tampered pointer cannot send the run elsewhere."""
    uri = storage.join(root, LATEST)
    try:
        pointer = json.loads(storage.read_bytes(uri))
    except storage.NotFound:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.error("%s is not valid JSON (%s); looking for the newest valid checkpoint instead", uri, exc)
        return None
    name = pointer.get("dir") if isinstance(pointer, dict) else None
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        log.error("%s names %r, not a step-<N> folder of this run; ignoring it", uri, name)
        return None
    return storage.join(root, name)


def find_resumable(root: str, check: CheckpointCheck | None = None, names: tuple[str, ...] | None = None,
                   prefetched: Prefetched | None = None) -> LoadedCheckpoint | None:
    """The newest good checkpoint under ``root``: the one ``latest.json`` names, else (reported) the newest
    older one that verifies, loads and passes ``check``. None when the run has no checkpoint yet.

    Anything unusable (a damaged manifest or state.json, a payload that fails its hash or that
    ``torch.load(weights_only=True)`` refuses, a state ``check`` rejects) is reported as CORRUPT and skipped.
    """
    latest = read_latest(root)
    listed = list_checkpoints(root)
    candidates = [latest] if latest else []
    others = [c.uri for c in reversed(listed) if c.committed and c.uri != latest]
    if latest:
        latest_step = int(STEP_DIR.fullmatch(storage.basename(latest)).group(1))  # type: ignore[union-attr]
        others = [uri for uri in others if int(storage.basename(uri)[5:]) < latest_step]
    for uri in candidates + others:
        try:
            checkpoint = load_checkpoint(uri, names, prefetched)
            if check is not None:
                check(checkpoint)
        except CheckpointError as exc:
            log.error("CORRUPT checkpoint skipped: %s; trying the previous one", exc)
            continue
        if uri != latest:
            log.warning("using %s, an older checkpoint than latest.json names", uri)
        return checkpoint
    if candidates or others or any(c.problem for c in listed):
        raise CheckpointError(f"{root}: no checkpoint verifies; start over with checkpoint.resume=never or name a "
                              "good one with checkpoint.resume=<URI>")
    return None


def resolve(uri: str, check: CheckpointCheck | None = None,
            names: tuple[str, ...] | None = None) -> LoadedCheckpoint:
    """An explicitly named checkpoint: a ``step-<N>`` folder (used as it is), or a checkpoints or run folder (its
    newest good checkpoint, falling back past CORRUPT ones)."""
    if storage.exists(storage.join(uri, MANIFEST)):
        checkpoint = load_checkpoint(uri, names)
        if check is not None:
            check(checkpoint)
        return checkpoint
    for root in (uri, checkpoints_uri(uri)):
        if storage.exists(storage.join(root, LATEST)) or any(c.committed or c.problem for c in list_checkpoints(root)):
            found = find_resumable(root, check, names)
            if found is not None:
                return found
    raise CheckpointError(f"{uri}: no checkpoint there (expected a step-<N> folder with {MANIFEST}, or a run or "
                          "checkpoints folder with latest.json)")
