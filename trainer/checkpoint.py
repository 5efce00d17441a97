"""Checkpoints under ``<run>/checkpoints/`` (local or S3) with the commit protocol of DESIGN.md.

A checkpoint is a folder ``step-<N>/`` of payload objects (torch files and a JSON state), then a
``manifest.json`` with each object's size and sha256, then ``checkpoints/latest.json`` naming the folder (one
small PUT). A crash anywhere before that last PUT leaves the previous checkpoint as latest; a reader verifies the
checksums and falls back to the newest checkpoint that verifies. Retention deletes old folders only after a newer
commit, and never the best one.

Saving is split in two so training stalls only for a copy to CPU memory: ``snapshot`` (synchronous, every rank
agrees on the step before calling it) and the upload, in a background thread (``CheckpointWriter``). Only rank 0
writes. Every load uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain containers, and
nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

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


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"  # zero-padded: listing order is step order


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


# ------------------------------------------------------------------------------------------ snapshot
def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU memory: training may change the originals right after."""
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

    def __init__(self, run_uri: str, keep_last: int = 3, attempts: int = 3, retry_wait_s: float = 2.0) -> None:
        self.root = checkpoints_uri(run_uri)
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
    committed: bool  # has a manifest
    metric: float | None = None
    epoch: int | None = None
    size: int = 0
    created: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


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
                item.committed = False
            else:
                item.metric, item.epoch = manifest.get("metric"), manifest.get("epoch")
                item.files, item.created = manifest["files"], manifest.get("created")
                item.size = sum(int(f["size"]) for f in item.files.values())
        found.append(item)
    return found


def read_manifest(folder: str) -> dict[str, Any]:
    uri = storage.join(folder, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except storage.NotFound as exc:
        raise CheckpointError(f"{folder}: no {MANIFEST} (an upload that never completed)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                             dict):
        raise CheckpointError(f"{uri}: not a detection-trainer checkpoint manifest")
    for name, entry in manifest["files"].items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or not isinstance(entry, dict):
            raise CheckpointError(f"{uri}: invalid file entry {name!r}")
    return manifest


@dataclass
class LoadedCheckpoint:
    uri: str
    step: int
    epoch: int
    state: dict[str, Any]
    objects: dict[str, Any]
    metric: float | None


def load_checkpoint(folder: str, names: tuple[str, ...] | None = None) -> LoadedCheckpoint:
    """Read and verify one checkpoint folder (sizes and sha256 of every payload object), then load it safely.

    ``names`` limits which ``.pt`` objects are loaded (e.g. only ``model`` for an export); all are verified.
    """
    manifest = read_manifest(folder)
    loaded: dict[str, Any] = {}
    state: dict[str, Any] | None = None

    def fetch(item: tuple[str, dict[str, Any]]) -> bytes:
        name, entry = item
        uri = storage.join(folder, name)
        try:
            data = storage.read_bytes(uri, size_hint=entry.get("size"))
        except storage.NotFound as exc:
            raise CheckpointError(f"{uri}: listed in the manifest but missing") from exc
        if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"{uri}: size or sha256 differs from the manifest (corrupt or partial)")
        return data

    items = sorted(manifest["files"].items())
    with ThreadPoolExecutor(max(1, len(items))) as pool:  # all objects at once, each verified as it arrives
        contents = list(pool.map(fetch, items))
    for (name, _), data in zip(items, contents, strict=True):
        uri = storage.join(folder, name)
        if name == "state.json":
            state = json.loads(data)
        elif name.endswith(".pt") and (names is None or name[:-3] in names):
            try:
                with warnings.catch_warnings():  # torch warns about plain pickles before it refuses them
                    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                    loaded[name[:-3]] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:  # anything torch.load refuses is unusable, whatever the reason
                raise CheckpointError(f"{uri}: refused by torch.load(weights_only=True): "
                                      f"{str(exc).splitlines()[0][:200]}") from exc
    if state is None:
        raise CheckpointError(f"{folder}: the manifest lists no state.json")
    return LoadedCheckpoint(folder, int(manifest["step"]), int(manifest.get("epoch") or 0), state, loaded,
                            manifest.get("metric"))


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


def find_resumable(root: str) -> LoadedCheckpoint | None:
    """The newest good checkpoint under ``root``: the one ``latest.json`` names, else (reported) the newest
    older one that verifies. None when the run has no checkpoint yet."""
    latest = read_latest(root)
    candidates = [latest] if latest else []
    others = [c.uri for c in reversed(list_checkpoints(root)) if c.committed and c.uri != latest]
    if latest:
        latest_step = int(STEP_DIR.fullmatch(storage.basename(latest)).group(1))  # type: ignore[union-attr]
        others = [uri for uri in others if int(storage.basename(uri)[5:]) < latest_step]
    for uri in candidates + others:
        try:
            checkpoint = load_checkpoint(uri)
        except CheckpointError as exc:
            log.error("cannot resume from %s: %s; trying the previous checkpoint", uri, exc)
            continue
        if uri != latest:
            log.warning("resuming from %s, an older checkpoint than latest.json names", uri)
        return checkpoint
    if candidates or others:
        raise CheckpointError(f"{root}: no checkpoint verifies; start over with checkpoint.resume=never or name a "
                              "good one with checkpoint.resume=<URI>")
    return None


def resolve(uri: str) -> LoadedCheckpoint:
    """An explicitly named checkpoint: a ``step-<N>`` folder, a checkpoints folder or a run folder."""
    if storage.exists(storage.join(uri, MANIFEST)):
        return load_checkpoint(uri)
    for root in (uri, checkpoints_uri(uri)):
        if storage.exists(storage.join(root, LATEST)) or any(c.committed for c in list_checkpoints(root)):
            found = find_resumable(root)
            if found is not None:
                return found
    raise CheckpointError(f"{uri}: no checkpoint there (expected a step-<N> folder with {MANIFEST}, or a run or "
                          "checkpoints folder with latest.json)")
