"""The loader's disk cache: hits, the size bound with LRU eviction, and use through the dataset."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tests.support.images import simple_dataset
from trainer.data.cache import DiskCache
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection, ObjectSource
from trainer.data.loader import LoaderStats


def test_get_put_and_least_recently_used_eviction(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes=3000, check_every=1)
    assert cache.get("s3://b/a") is None
    for name in "abc":
        cache.put(f"s3://b/{name}", name.encode() * 1000)
        time.sleep(0.01)
    assert cache.get("s3://b/a") == b"a" * 1000  # refreshes 'a'
    time.sleep(0.01)
    cache.put("s3://b/d", b"d" * 1000)  # over the bound: the least recently used ('b') goes
    assert cache.get("s3://b/b") is None
    assert cache.get("s3://b/a") is not None and cache.get("s3://b/d") is not None
    assert cache.size() <= 3000
    cache.put("s3://b/huge", os.urandom(5000))  # larger than the whole cache: not stored
    assert cache.get("s3://b/huge") is None
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "c").rglob("*"))


def test_dataset_reads_through_the_cache_with_identical_samples(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path)
    index = load_coco_index(str(coco))
    plain = CocoDetection(index, str(images))
    cached = CocoDetection(index, str(images), source=ObjectSource(DiskCache(tmp_path / "cache", 10**8)))
    stats = LoaderStats()
    for _ in range(2):
        samples = cached.__getitems__(list(range(len(cached))))
        stats.update([meta for _, _, meta in samples])
    assert [m.cache_hit for _, _, m in samples] == [True] * len(cached)
    assert stats.snapshot().cache_hit_rate == 0.5
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], cached[i][0])
