"""DataLoader assembly for detection batches, and the loader counters shown in the training logs.

Batches are ``(images, targets, metas)``: lists, because detection images differ in size (the model batches
them itself). The per-sample metadata (fetch time, cache hit, skipped objects) rides along with the batch,
so counters gathered in worker processes reach the main process without any shared state.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.data.dataset import CocoDetection, SampleMeta


def collate(batch: Sequence[tuple[Any, Any, SampleMeta]]) -> tuple[list[Any], list[Any], list[SampleMeta]]:
    images, targets, metas = zip(*batch, strict=True)
    return list(images), list(targets), list(metas)


class EpochTaggedBatches:
    """Wraps a batch sampler so each index carries the sampler's current epoch: ``[(epoch, index), ...]``."""

    def __init__(self, batch_sampler: Iterable[list[int]]) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = int(getattr(self.batch_sampler, "epoch", 0))
        for batch in self.batch_sampler:
            yield [(epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


def build_loader(dataset: CocoDetection, batch_sampler: Iterable[list[int]], workers: int = 4,
                 pin_memory: bool | None = None, prefetch_factor: int = 4,
                 persistent_workers: bool = True) -> DataLoader:
    """A DataLoader over ``dataset`` driven by a (resumable) batch sampler; pin memory on CUDA by default."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers}
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run (which creates
    # one more) would diverge from an uninterrupted one. Augmentation is seeded per sample, not per worker.
    return DataLoader(dataset, batch_sampler=EpochTaggedBatches(batch_sampler), num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, worker_init_fn=detach_from_signals,
                      generator=torch.Generator().manual_seed(0), **extra)


def detach_from_signals(worker_id: int) -> None:
    """Loader workers leave the training process's process group and take default signal handlers.

    torchrun stops a worker by signalling its whole process group (SIGTERM on preemption): workers that died
    first would crash the training process before it can save its checkpoint. In their own group they keep
    serving batches; the training process stops them when it exits (and they exit if it dies). They must not keep
    the training process's SIGTERM handler, or that stop would be ignored and the exit would wait forever.
    """
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle


@dataclass
class LoaderSnapshot:
    images_per_s: float
    fetch_p50_ms: float
    fetch_p95_ms: float
    cache_hit_rate: float | None
    skipped: int

    def as_dict(self) -> dict[str, Any]:
        return {"loader_images_per_s": round(self.images_per_s, 2), "fetch_p50_ms": round(self.fetch_p50_ms, 2),
                "fetch_p95_ms": round(self.fetch_p95_ms, 2), "cache_hit_rate": self.cache_hit_rate,
                "skipped_images": self.skipped}


class LoaderStats:
    """Per-rank counters over a sliding window: images/s, fetch latency p50/p95, cache hits, skipped images."""

    def __init__(self, window: int = 2000) -> None:
        self.fetch_seconds: deque[float] = deque(maxlen=window)
        self.hits = self.lookups = 0
        self.skipped = 0
        self.images = 0
        self.started = time.perf_counter()
        self.skipped_uris: list[str] = []

    def update(self, metas: Sequence[SampleMeta]) -> None:
        for meta in metas:
            self.images += 1
            self.fetch_seconds.append(meta.fetch_seconds)
            if meta.cache_hit is not None:
                self.lookups += 1
                self.hits += meta.cache_hit
            if meta.skipped:
                self.skipped += len(meta.skipped)
                self.skipped_uris.extend(meta.skipped[: max(0, 100 - len(self.skipped_uris))])

    def snapshot(self) -> LoaderSnapshot:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        latencies = np.array(self.fetch_seconds or [0.0]) * 1000
        return LoaderSnapshot(self.images / elapsed, float(np.percentile(latencies, 50)),
                              float(np.percentile(latencies, 95)),
                              self.hits / self.lookups if self.lookups else None, self.skipped)
