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
Data: BCCD's train split (205 JPEGs of 640x480), converted in-process, ``--passes`` passes per row. Each row
reports images/s over all passes, its steady rate (passes after the first, once the workers and their S3 clients
are up) and the seconds to its first batch: with 205 images a pass, start-up is a large share of a short row.
Every row is measured once per repeat, in turn (``--repeats``), and reported as its median.
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
from typing import Any, NamedTuple

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


class Measure(NamedTuple):
    images_per_s: float
    cpu_ms_per_image: float  # the loading process and its workers (start-up included), user + system
    server_cpu_ms_per_image: float  # the S3 endpoint (nginx), which shares the machine's cores; 0 for local rows
    steady_images_per_s: float  # passes after the first: the workers are up, their clients connected
    first_batch_s: float  # start-up: workers forked, clients made, the first batch decoded


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def images_per_second(loader: Any, passes: int, set_epoch: Any = None, server_pid: int | None = None) -> Measure:
    """Images/s over ``passes`` passes, and CPU per image of this process plus the loader's (persistent)
    workers, read from /proc before they exit: CPU per image does not depend on how the 2 cores were shared.
    With ``server_pid``, the S3 endpoint's CPU per image too: on a small machine it takes from the same cores."""
    count = first_pass_count = 0
    cpu_started = _cpu_seconds(os.getpid())
    server_started = _cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    first_batch = first_pass = 0.0
    for epoch in range(passes):
        if set_epoch:
            set_epoch(epoch)
        for batch in loader:
            count += len(batch[0])
            first_batch = first_batch or time.perf_counter() - started
        if epoch == 0:
            first_pass, first_pass_count = time.perf_counter() - started, count
    seconds = time.perf_counter() - started
    workers = loader._iterator._workers  # the bench's only use of DataLoader internals
    cpu = _cpu_seconds(os.getpid()) - cpu_started + sum(_cpu_seconds(w.pid) for w in workers)
    server = _cpu_seconds(server_pid) - server_started if server_pid else 0.0
    return Measure(count / seconds, 1000 * cpu / count, 1000 * server / count,
                   (count - first_pass_count) / (seconds - first_pass), first_batch)


def ours(coco: str, images: str, args: argparse.Namespace, source: ObjectSource | None = None,
         plain_sampler: bool = False, server_pid: int | None = None) -> Measure:
    dataset = CocoDetection(load_coco_index(coco), images, build_transforms(args.augment), source=source)
    if plain_sampler:
        sampler: Any = BatchSampler(RandomSampler(range(len(dataset))), args.batch_size, drop_last=False)
        set_epoch = None
    else:
        sampler = ResumableDistributedBatchSampler(len(dataset), args.batch_size, 1, 0, seed=0)
        set_epoch = sampler.set_epoch
    loader = build_loader(dataset, sampler, workers=args.workers, persistent_workers=True)
    return images_per_second(loader, args.passes, set_epoch, server_pid)


def reference(coco: str, images: str, args: argparse.Namespace) -> Measure:
    """torchvision's references: PIL decode, PIL→tensor, the same augmentation, float conversion in the loader."""
    transforms = v2.Compose([v2.ToImage(), build_transforms(args.augment, to_float=True)])
    dataset = wrap_dataset_for_transforms_v2(
        TorchvisionCoco(images, coco, transforms=transforms),
        target_keys=("boxes", "labels", "image_id"))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=lambda batch: tuple(zip(*batch, strict=True)), persistent_workers=True,
                        prefetch_factor=4)
    return images_per_second(loader, args.passes)


class S3Rows:
    """The S3 rows: the same images served by nginx at path-style URLs (bench/_static_s3.py), one server with no
    added latency and one with ``--latency-ms`` per request, both up for the whole run so their rows alternate
    with the local ones; the disk-cache rows start each repeat from an empty cache (cold), then read it again
    (warm)."""

    def __init__(self, work: Path, coco: str, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        bucket = work / "s3root" / "bench"
        shutil.copytree(BCCD / "JPEGImages", bucket / "images")
        shutil.copy(coco, bucket / "train.json")
        self.servers = {latency: StaticS3(work / "s3root", latency_ms=latency)
                        for latency in (0.0, args.latency_ms)}
        self.repeat = 0

    def __enter__(self) -> S3Rows:
        self.saved = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
        for server in self.servers.values():
            server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers.values():
            server.__exit__()
        self._aws_env(self.saved)

    @staticmethod
    def _aws_env(values: dict[str, str]) -> None:
        """Make ``values`` this process's only AWS variables (the loader's workers inherit them)."""
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(values)

    def measure(self) -> dict[str, Measure]:
        rows: dict[str, Measure] = {}
        self.repeat += 1
        for latency, server in self.servers.items():
            self._aws_env({name: value for name, value in server.client_env().items() if name.startswith("AWS_")})
            label = f"ours, S3 (nginx) +{latency:g} ms/request"
            rows[label] = ours("s3://bench/train.json", "s3://bench/images", self.args, server_pid=server.pid)
            if latency:
                cache = DiskCache(self.work / f"cache-{self.repeat}", 10**9)
                for kind in ("cold", "warm"):
                    rows[f"{label}, {kind} disk cache"] = ours("s3://bench/train.json", "s3://bench/images",
                                                               self.args, ObjectSource(cache), server_pid=server.pid)
                shutil.rmtree(self.work / f"cache-{self.repeat}")
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=6, help="loader workers (more than cores: hides latency)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--passes", type=int, default=4, help="passes per row (the first includes start-up)")
    parser.add_argument("--augment", default="hflip")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of every row (medians)")
    args = parser.parse_args()
    if args.passes < 2:
        parser.error("--passes must be at least 2: steady images/s are measured after the first")
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
        ours(coco, images, args)  # warm the page cache and imports, so the first row is not penalised
        # Every row once per repeat, in the same order (ABCABC), each row's median kept: drift (another job, the
        # CPU's clock) hits all of them alike, and the S3 rows are compared with local rows of the same moments.
        samples: dict[str, list[Measure]] = {}
        with S3Rows(work, coco, args) as s3:
            for _ in range(args.repeats):
                measured = {"ours, local disk": ours(coco, images, args),
                            "torchvision reference, local disk": reference(coco, images, args),
                            "ours, local disk, plain BatchSampler": ours(coco, images, args, plain_sampler=True),
                            **s3.measure()}
                for name, value in measured.items():
                    samples.setdefault(name, []).append(value)

    def median(field: str) -> dict[str, float]:
        return {name: statistics.median(getattr(m, field) for m in values) for name, values in samples.items()}

    rate, cpu, server, steady, first = (median(f) for f in ("images_per_s", "cpu_ms_per_image",
                                                            "server_cpu_ms_per_image", "steady_images_per_s",
                                                            "first_batch_s"))
    local = "ours, local disk"
    print(f"  {'pipeline':<52}{'images/s':>9} {'vs local':>9} {'CPU ms/img':>11} {'vs local':>9}"
          f" {'server':>7} {'steady':>8} {'vs local':>9} {'1st batch':>10}  each repeat (images/s)")
    for name in samples:
        spread = " ".join(f"{m.images_per_s:.0f}" for m in samples[name])
        print(f"  {name:<52} {rate[name]:9.1f} {rate[name] / rate[local]:8.2f}x {cpu[name]:11.2f} "
              f"{cpu[name] / cpu[local]:8.2f}x {server[name]:7.2f} {steady[name]:8.1f} "
              f"{steady[name] / steady[local]:8.2f}x "
              f"{first[name]:9.2f}s  {spread}")
    print(f"  images/s: all {args.passes} passes (start-up included); CPU ms/img: the loader's processes; server: "
          f"the S3 endpoint's CPU ms/img, on the same cores; steady: passes 2 to {args.passes}; 1st batch: seconds to "
          "the first batch (workers forked, clients made)")
    reference_rate = rate["torchvision reference, local disk"]
    print(f"  ours vs torchvision reference (local disk): {rate[local] / reference_rate:.2f}x")
    slow, fast = (f"ours, S3 (nginx) +{v:g} ms/request" for v in (args.latency_ms, 0.0))
    print(f"  S3 +{args.latency_ms:g} ms vs local disk: {rate[slow] / rate[local]:.2f}x images/s, "
          f"{steady[slow] / steady[local]:.2f}x steady (target >= 0.95x), {cpu[slow] / cpu[local]:.2f}x CPU per "
          f"image, {(cpu[slow] + server[slow]) / cpu[local]:.2f}x with the server's; latency hiding, "
          f"S3 +{args.latency_ms:g} ms vs S3 +0 ms: {rate[slow] / rate[fast]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
