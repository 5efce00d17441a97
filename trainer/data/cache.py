"""A size-bounded local disk cache of fetched objects, shared by all loader workers of a node.

Entries are named by a hash of the URI and written atomically (temp file + rename), so a worker killed mid-write
never leaves a truncated entry, and concurrent workers can share one directory. When the directory grows past
``max_bytes``, the least recently used entries (by mtime; a hit refreshes it) are removed. It assumes the data
set's objects are immutable, as training data should be: a changed object under the same URI is not noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


class DiskCache:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, check_every: int = 64) -> None:
        if max_bytes <= 0:
            raise ValueError("the cache size must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.check_every = check_every
        self._puts = 0
        self._added = 0

    def _path(self, uri: str) -> Path:
        digest = hashlib.sha256(uri.encode()).hexdigest()
        return self.directory / digest[:2] / digest[2:]

    def get(self, uri: str) -> bytes | None:
        path = self._path(uri)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return data

    def put(self, uri: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(uri)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return  # a cache that cannot write just misses
        self._puts += 1
        self._added += len(data)
        if self._puts % self.check_every == 0 or self._added > self.max_bytes // 8:
            self.evict()

    def size(self) -> int:
        return sum(entry.stat().st_size for entry in self._entries())

    def _entries(self) -> list[Path]:
        return [p for p in self.directory.glob("*/*") if not p.name.startswith(".tmp-")]

    def evict(self) -> None:
        """Remove least recently used entries until the cache fits in ``max_bytes``."""
        self._added = 0
        entries = []
        for path in self._entries():
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
