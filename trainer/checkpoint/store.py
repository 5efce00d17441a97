"""The reading half of the commit protocol: listing checkpoints, checking manifests, downloading and verifying
payloads (sizes and sha256), and choosing the newest good checkpoint, falling back past CORRUPT ones.

Every load uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain containers, and nothing
in it can run code. Torch is imported only where tensors are touched, so a starting process can fetch and verify
the checkpoint it resumes from while torch is still being imported (``LatestPrefetch``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from trainer import storage
from trainer.checkpoint.layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_POINTER_BYTES,
    STEP_DIR,
    CheckpointCheck,
    CheckpointError,
    checkpoints_uri,
    step_dir_name,
)

log = logging.getLogger("trainer.checkpoint")


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
        manifest = json.loads(storage.read_bytes(uri, max_bytes=MAX_MANIFEST_BYTES))
    except storage.NotFound as exc:
        raise CheckpointError(f"{folder}: no {MANIFEST} (an upload that never completed)") from exc
    except storage.TooLarge as exc:
        raise CheckpointError(f"{uri}: {exc.size} bytes, not a manifest (at most {exc.limit}); not read") from exc
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
            data = storage.read_bytes(uri, size_hint=entry["size"], max_bytes=entry["size"])
        except storage.NotFound as exc:
            raise CheckpointError(f"{uri}: listed in the manifest but missing") from exc
        except storage.TooLarge as exc:  # refused unread: a planted object can be any size
            raise CheckpointError(f"{uri}: {exc.size} bytes, larger than the manifest's {entry['size']} (corrupt or "
                                  "replaced); not read") from exc
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
        pointer = json.loads(storage.read_bytes(uri, max_bytes=MAX_POINTER_BYTES))
    except storage.NotFound:
        return None
    except storage.TooLarge as exc:
        log.error("%s is %d bytes, not a pointer (at most %d); looking for the newest valid checkpoint instead",
                  uri, exc.size, exc.limit)
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
