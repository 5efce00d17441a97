"""The assembled loader: identical batches for any worker count, from local disk and from S3."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import S3Env
from tests.support.images import simple_dataset
from trainer import storage
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.loader import LoaderStats, build_loader
from trainer.data.transforms import build_transforms


class FixedBatches:
    """A minimal batch sampler with an epoch, standing in for the training sampler."""

    def __init__(self, batches: list[list[int]], epoch: int = 0) -> None:
        self.batches, self.epoch = batches, epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


BATCHES = [[0, 5, 3], [7, 1, 2], [11, 4, 9], [6, 8, 10]]


def collect(coco: str, images: str, workers: int, epoch: int = 1) -> list[tuple[list[torch.Tensor], list, list]]:
    ds = CocoDetection(load_coco_index(coco), images, build_transforms("ssd"), seed=5)
    loader = build_loader(ds, FixedBatches(BATCHES, epoch), workers=workers, persistent_workers=False)
    return list(loader)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a, _), (images_b, targets_b, _) in zip(a, b, strict=True):
        for x, y in zip(images_a, images_b, strict=True):
            assert torch.equal(x, y)
        for x, y in zip(targets_a, targets_b, strict=True):
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])


def test_worker_count_does_not_change_a_single_tensor(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path)
    reference = collect(str(coco), str(images), workers=0)
    assert_same(reference, collect(str(coco), str(images), workers=2))
    assert_same(reference, collect(str(coco), str(images), workers=1))
    other_epoch = collect(str(coco), str(images), workers=0, epoch=2)
    assert any(not torch.equal(a, b) for batch_a, batch_b in zip(reference, other_epoch, strict=True)
               for a, b in zip(batch_a[0], batch_b[0], strict=True))


def test_s3_images_give_the_same_batches_as_local_ones(tmp_path: Path, s3: S3Env) -> None:
    coco, images = simple_dataset(tmp_path)
    storage.copy_tree(images, s3.uri("data/images"))
    storage.copy(coco, s3.uri("data/coco.json"))
    local = collect(str(coco), str(images), workers=0)
    remote = collect(s3.uri("data/coco.json"), s3.uri("data/images"), workers=2)
    assert_same(local, remote)
    stats = LoaderStats()
    for _, _, metas in remote:
        stats.update(metas)
    snapshot = stats.snapshot()
    assert stats.images == 12 and snapshot.skipped == 0 and snapshot.fetch_p95_ms >= snapshot.fetch_p50_ms > 0
    assert snapshot.cache_hit_rate is None


def test_resume_mid_epoch_through_prefetching_workers_continues_the_same_batches(tmp_path: Path) -> None:
    from trainer.data.sampler import ResumableDistributedBatchSampler

    coco, images = simple_dataset(tmp_path, count=12)
    ds = CocoDetection(load_coco_index(str(coco)), str(images), build_transforms("hflip"), seed=1)

    def run(sampler: ResumableDistributedBatchSampler, steps: int | None = None) -> list:
        loader = build_loader(ds, sampler, workers=2, prefetch_factor=2, persistent_workers=False)
        out = []
        for step, batch in enumerate(loader):
            if steps is not None and step == steps:
                break  # the workers have prefetched further than this
            out.append(batch)
        return out

    def make() -> ResumableDistributedBatchSampler:
        sampler = ResumableDistributedBatchSampler(len(ds), batch_size=2, num_replicas=1, rank=0, seed=4)
        sampler.set_epoch(3)
        return sampler

    uninterrupted = run(make())
    first = make()
    before = run(first, steps=2)
    state = first.state_dict(consumed_batches=2)
    resumed_sampler = make()
    resumed_sampler.load_state_dict(state)
    after = run(resumed_sampler)
    assert_same(uninterrupted, before + after)
    assert [t["image_id"] for b in before + after for t in b[1]] == \
        [t["image_id"] for b in uninterrupted for t in b[1]]
