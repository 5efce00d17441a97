"""Loader throughput (images/s), every pipeline measured in the same run, printed as ratios.

Rows:
  * ours from local disk (the baseline for the S3 rows);
  * ours from S3 at +0 ms and at ``--latency-ms`` per request (target >= 0.95x of local disk), then through the
    disk cache, cold (first pass fills it) and warm. The S3 endpoint is nginx serving the images at path-style
    URLs with the delay added inside nginx (bench/_static_s3.py): the moto server and the Python fault proxy
    the tests use cost as much CPU per request as the client, so on 2 cores they measured the server;
  * a torchvision-reference-style loader from local disk: ``torchvision.datasets.CocoDetection`` (PIL decode)
    wrapped for transforms v2, with the same transforms (target: ours >= 1.5x);
  * ours with torch's plain BatchSampler instead of the resumable sampler (the sampler's cost when unused).
Data: BCCD's train split (205 JPEGs of 640x480), converted in-process, ``--passes`` passes per row.
Run: ``.venv/bin/python bench/dataloader.py [--workers 4] [--latency-ms 20]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from _static_s3 import StaticS3, missing_tools  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler  # noqa: E402
from torchvision.datasets import CocoDetection as TorchvisionCoco  # noqa: E402
from torchvision.datasets import wrap_dataset_for_transforms_v2  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from trainer.annotations.convert import ConvertOptions, convert  # noqa: E402
from trainer.data.cache import DiskCache  # noqa: E402
from trainer.data.coco_index import load_coco_index  # noqa: E402
from trainer.data.dataset import CocoDetection, ObjectSource  # noqa: E402
from trainer.data.loader import build_loader  # noqa: E402
from trainer.data.sampler import ResumableDistributedBatchSampler  # noqa: E402
from trainer.data.transforms import build_transforms  # noqa: E402

BCCD = REPO / "examples" / "data" / "bccd"


def images_per_second(loader: Any, passes: int, set_epoch: Any = None) -> float:
    count = 0
    started = time.perf_counter()
    for epoch in range(passes):
        if set_epoch:
            set_epoch(epoch)
        for batch in loader:
            count += len(batch[0])
    return count / (time.perf_counter() - started)


def ours(coco: str, images: str, args: argparse.Namespace, source: ObjectSource | None = None,
         plain_sampler: bool = False) -> float:
    dataset = CocoDetection(load_coco_index(coco), images, build_transforms(args.augment), source=source)
    if plain_sampler:
        sampler: Any = BatchSampler(RandomSampler(range(len(dataset))), args.batch_size, drop_last=False)
        set_epoch = None
    else:
        sampler = ResumableDistributedBatchSampler(len(dataset), args.batch_size, 1, 0, seed=0)
        set_epoch = sampler.set_epoch
    loader = build_loader(dataset, sampler, workers=args.workers, persistent_workers=True)
    return images_per_second(loader, args.passes, set_epoch)


def reference(coco: str, images: str, args: argparse.Namespace) -> float:
    """torchvision's references: PIL decode, PIL→tensor, the same augmentation, float conversion in the loader."""
    transforms = v2.Compose([v2.ToImage(), build_transforms(args.augment, to_float=True)])
    dataset = wrap_dataset_for_transforms_v2(
        TorchvisionCoco(images, coco, transforms=transforms),
        target_keys=("boxes", "labels", "image_id"))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=lambda batch: tuple(zip(*batch, strict=True)), persistent_workers=True,
                        prefetch_factor=4)
    return images_per_second(loader, args.passes)


def s3_rows(work: Path, coco: str, args: argparse.Namespace) -> dict[str, float]:
    """The S3 rows: the same images served by nginx at path-style URLs (bench/_static_s3.py), with no added
    latency and with ``--latency-ms`` per request, cold and with the disk cache warm."""
    bucket = work / "s3root" / "bench"
    shutil.copytree(BCCD / "JPEGImages", bucket / "images")
    shutil.copy(coco, bucket / "train.json")
    rows: dict[str, float] = {}
    saved = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    try:
        for latency in (0.0, args.latency_ms):
            with StaticS3(work / "s3root", latency_ms=latency) as server:
                os.environ.update(AWS_ENDPOINT_URL=server.endpoint_url, AWS_ACCESS_KEY_ID="bench",
                                  AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
                label = f"ours, S3 (nginx) +{latency:g} ms/request"
                rows[label] = ours("s3://bench/train.json", "s3://bench/images", args)
                if latency:
                    cache = DiskCache(work / f"cache-{latency:g}", 10**9)
                    rows[label + ", cold disk cache"] = ours("s3://bench/train.json", "s3://bench/images", args,
                                                             source=ObjectSource(cache))
                    rows[label + ", warm disk cache"] = ours("s3://bench/train.json", "s3://bench/images", args,
                                                             source=ObjectSource(cache))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6, help="loader workers (more than cores: hides latency)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--augment", default="hflip")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the local rows")
    args = parser.parse_args()
    problem = missing_tools()
    if problem:
        print(f"bench/dataloader.py: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        convert(ConvertOptions(str(BCCD), str(work / "coco"), splits=["train"], workers=1), on_progress=lambda _: None)
        coco, images = str(work / "coco" / "train.json"), str(BCCD / "JPEGImages")
        print(f"loader bench: BCCD train (205 images), batch {args.batch_size}, {args.workers} workers, "
              f"{args.passes} passes, augment {args.augment}, torch threads 1")
        rows: dict[str, float] = {}
        ours(coco, images, args)  # warm the page cache and imports, so the first row is not penalised
        # Alternate the local rows (ABCABC) and keep each one's median, so drift hits all of them alike.
        local: dict[str, list[float]] = {"ours, local disk": [], "torchvision reference, local disk": [],
                                         "ours, local disk, plain BatchSampler": []}
        for _ in range(args.repeats):
            local["ours, local disk"].append(ours(coco, images, args))
            local["torchvision reference, local disk"].append(reference(coco, images, args))
            local["ours, local disk, plain BatchSampler"].append(ours(coco, images, args, plain_sampler=True))
        rows.update({name: statistics.median(values) for name, values in local.items()})

        rows.update(s3_rows(work, coco, args))

    base = rows["ours, local disk"]
    print(f"  {'pipeline':<52} {'images/s':>9} {'vs ours local':>14}")
    for name, value in rows.items():
        print(f"  {name:<52} {value:9.1f} {value / base:13.2f}x")
    print(f"  ours vs torchvision reference (local disk): {base / rows['torchvision reference, local disk']:.2f}x")
    slow, fast = (rows[f"ours, S3 (nginx) +{v:g} ms/request"] for v in (args.latency_ms, 0.0))
    print(f"  S3 +{args.latency_ms:g} ms vs local disk: {slow / base:.2f}x (target >= 0.95x); "
          f"latency hiding, S3 +{args.latency_ms:g} ms vs S3 +0 ms: {slow / fast:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
