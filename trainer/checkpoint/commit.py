"""The writing half of the commit protocol: snapshot → upload the payload → manifest → ``latest.json`` →
retention (DESIGN.md). A crash anywhere before ``latest.json`` leaves the previous checkpoint as latest.

Saving is split in two so training stalls only for a copy to CPU memory: the snapshot (synchronous, every rank
agrees on the step before taking it) and the upload, in a background thread (``CheckpointWriter``). Only rank 0
writes; every write of ``latest.json`` and every retention delete is fenced by the run's lease.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trainer import storage
from trainer.checkpoint.layout import FORMAT, LATEST, MANIFEST, checkpoints_uri, step_dir_name
from trainer.checkpoint.store import list_checkpoints
from trainer.progress import format_checkpoint

log = logging.getLogger("trainer.checkpoint")


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


