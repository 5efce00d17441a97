"""Loader throughput (images/s), every pipeline measured in the same run, printed as ratios.

Rows:
  * ours from local disk (the baseline for the S3 rows);
  * ours from the local S3 server through the fault proxy adding ``--latency-ms`` per request (target >= 0.95x
    of local disk), and the same with the disk cache warm (second pass);
  * a torchvision-reference-style loader from local disk: ``torchvision.datasets.CocoDetection`` (PIL decode)
    wrapped for transforms v2, with the same transforms (target: ours >= 1.5x);
  * ours with torch's plain BatchSampler instead of the resumable sampler (the sampler's cost when unused).
Data: BCCD's train split (205 JPEGs of 640x480), converted in-process, ``--passes`` passes per row.
Run: ``.venv/bin/python bench/dataloader.py [--workers 4] [--latency-ms 20]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler  # noqa: E402
from torchvision.datasets import CocoDetection as TorchvisionCoco  # noqa: E402
from torchvision.datasets import wrap_dataset_for_transforms_v2  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from trainer import storage  # noqa: E402
from trainer.annotations.convert import ConvertOptions, convert  # noqa: E402
from trainer.data.cache import DiskCache  # noqa: E402
from trainer.data.coco_index import load_coco_index  # noqa: E402
from trainer.data.dataset import CocoDetection, ObjectSource  # noqa: E402
from trainer.data.loader import build_loader  # noqa: E402
from trainer.data.sampler import ResumableDistributedBatchSampler  # noqa: E402
from trainer.data.transforms import build_transforms  # noqa: E402
from trainer.local_s3 import LocalS3Server  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6, help="loader workers (more than cores: hides latency)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--augment", default="hflip")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the local rows")
    args = parser.parse_args()
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

        with LocalS3Server("127.0.0.1") as server:
            server.apply_env()
            import boto3

            boto3.client("s3", endpoint_url=server.endpoint_url).create_bucket(Bucket="bench")
            storage.copy_tree(BCCD / "JPEGImages", "s3://bench/images")
            storage.copy(coco, "s3://bench/train.json")
            for latency in (0.0, args.latency_ms):
                proxy = subprocess.Popen(
                    [sys.executable, "-m", "tests.support.fault_proxy", "--upstream", f"{server.host}:{server.port}",
                     "--latency-ms", str(latency), "--max-seconds", "1800"],
                    cwd=REPO, stdout=subprocess.PIPE, text=True)
                try:
                    assert proxy.stdout is not None
                    os.environ["AWS_ENDPOINT_URL"] = proxy.stdout.readline().strip()
                    label = f"ours, S3 via proxy +{latency:g} ms/request"
                    rows[label] = ours("s3://bench/train.json", "s3://bench/images", args)
                    if latency:
                        cache = DiskCache(work / "cache", 10**9)
                        ours("s3://bench/train.json", "s3://bench/images", args, source=ObjectSource(cache))
                        rows[label + ", warm disk cache"] = ours("s3://bench/train.json", "s3://bench/images", args,
                                                                 source=ObjectSource(cache))
                finally:
                    proxy.terminate()
                    proxy.wait(timeout=10)

    base = rows["ours, local disk"]
    print(f"  {'pipeline':<52} {'images/s':>9} {'vs ours local':>14}")
    for name, value in rows.items():
        print(f"  {name:<52} {value:9.1f} {value / base:13.2f}x")
    print(f"  ours vs torchvision reference (local disk): {base / rows['torchvision reference, local disk']:.2f}x")
    slow, fast = (rows[f"ours, S3 via proxy +{v:g} ms/request"] for v in (args.latency_ms, 0.0))
    print(f"  latency hiding: S3 +{args.latency_ms:g} ms vs S3 +0 ms: {slow / fast:.2f}x "
          "(the S3 rows also pay the local server's and proxy's CPU on this machine's cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
