"""Storage throughput: the storage layer against plain boto3, measured in the same run, printed as ratios.

Cases (each run ``--repeats`` times, median reported):
  * one 256 MB object: ``storage.upload_file``/``download_file`` vs boto3's ``upload_file``/``download_file``
    (its transfer manager with default settings);
  * 2,000 objects of 100 KB: ``storage.copy_many`` (parallel) vs a sequential per-object loop, both with
    boto3's ``upload_file``/``download_file`` and with ``put_object``/``get_object`` (the faster naive loop);
  * the small-object case again through the fault proxy adding ``--latency-ms`` per request, which is closer
    to a real object store than a loopback server answering in about a millisecond;
  * client CPU ms per GET: 100 KB objects read by 16 threads, CPU time of this process (getrusage RUSAGE_SELF:
    the S3 server runs in its own process) per object, ``storage.read_bytes`` (the fast client, see
    trainer/s3_fast.py) against boto3's ``get_object`` with a pool large enough for 16 threads; the storage layer
    forced onto boto3 (``TRAINER_S3_CLIENT=boto3``) is shown beside them. The ratio is ours / boto3: lower is better.
  * the first read in a forked worker (``--only fork``): client CPU of a process forked from one that already
    reads S3, ours against a new boto3 session's first ``get_object``; lower is better.

Everything runs against a local moto server on 127.0.0.1 (and the proxy in its own process): nothing leaves
the machine. Run: ``make bench`` or ``.venv/bin/python bench/storage.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from trainer import s3_fast, storage  # noqa: E402
from trainer.local_s3 import LocalS3Server  # noqa: E402

MB = 1_000_000


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_medians(ours: Callable[[], Any], base: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median times of two contenders run alternately (ABBA...), so drift in the server hits both alike."""
    ours_t: list[float] = []
    base_t: list[float] = []
    for i in range(repeats):
        order = [(ours, ours_t), (base, base_t)]
        for fn, out in order if i % 2 == 0 else reversed(order):
            out.append(timed(fn))
    return statistics.median(ours_t), statistics.median(base_t)


class Bench:
    def __init__(self, endpoint: str, workdir: Path, repeats: int) -> None:
        self.endpoint = endpoint
        self.workdir = workdir
        self.repeats = repeats
        self.bucket = "bench"
        # The baseline client: what a user gets from boto3 with default settings.
        self.plain = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"mode": "standard"}))
        self.rows: list[dict[str, Any]] = []

    def use_endpoint(self, endpoint: str) -> None:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        self.plain = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"mode": "standard"}))

    def record(self, case: str, nbytes: int, ours: float, baseline: float, baseline_name: str) -> None:
        row = {"case": case, "baseline": baseline_name, "storage_MBps": nbytes / MB / ours,
               "baseline_MBps": nbytes / MB / baseline, "ratio": baseline / ours,
               "storage_s": ours, "baseline_s": baseline}
        self.rows.append(row)
        print(f"  {case:<44} {row['storage_MBps']:9.1f} {row['baseline_MBps']:9.1f} {row['ratio']:7.2f}x"
              f"   vs {baseline_name}", flush=True)

    # ------------------------------------------------------------------------------ one large object
    def large(self, size: int) -> None:
        src = self.workdir / "large.bin"
        with open(src, "wb") as handle:
            for _ in range(size // (16 * 1024 * 1024)):
                handle.write(os.urandom(16 * 1024 * 1024))
        size = src.stat().st_size
        uri = f"s3://{self.bucket}/large/ours.bin"
        label = f"{size // (1024 * 1024)} MB object"
        ours_up, base_up = paired_medians(
            lambda: storage.upload_file(src, uri),
            lambda: self.plain.upload_file(str(src), self.bucket, "large/plain.bin"), self.repeats)
        self.record(f"{label} upload", size, ours_up, base_up, "boto3 upload_file")
        out = self.workdir / "large.out"
        ours_down, base_down = paired_medians(
            lambda: storage.download_file(uri, out),
            lambda: self.plain.download_file(self.bucket, "large/plain.bin", str(out)), self.repeats)
        self.record(f"{label} download", size, ours_down, base_down, "boto3 download_file")
        src.unlink()
        out.unlink()
        storage.delete_prefix(f"s3://{self.bucket}/large")

    # ---------------------------------------------------------------------------- many small objects
    def small(self, count: int, size: int, tag: str = "") -> None:
        src = self.workdir / "small"
        src.mkdir(exist_ok=True)
        for i in range(count):
            (src / f"{i:05d}.bin").write_bytes(os.urandom(size))
        files = sorted(src.iterdir())
        total = count * size
        label = f"{count} x {size // 1000} KB{tag}"
        prefix = f"s3://{self.bucket}/small/ours"

        def ours_upload() -> None:
            storage.copy_tree(src, prefix)

        def loop_upload_file() -> None:
            for f in files:
                self.plain.upload_file(str(f), self.bucket, f"small/plain/{f.name}")

        def loop_put() -> None:
            for f in files:
                self.plain.put_object(Bucket=self.bucket, Key=f"small/plain/{f.name}", Body=f.read_bytes())

        ours_up, up_file = paired_medians(ours_upload, loop_upload_file, self.repeats)
        self.record(f"{label} upload", total, ours_up, up_file, "sequential boto3 upload_file loop")
        ours_up, up_put = paired_medians(ours_upload, loop_put, self.repeats)
        self.record(f"{label} upload", total, ours_up, up_put, "sequential put_object loop")

        out = self.workdir / "small-out"
        def ours_download() -> None:
            storage.copy_tree(prefix, out)

        def loop_download_file() -> None:
            for f in files:
                self.plain.download_file(self.bucket, f"small/plain/{f.name}", str(out / f.name))

        def loop_get() -> None:
            for f in files:
                body = self.plain.get_object(Bucket=self.bucket, Key=f"small/plain/{f.name}")["Body"].read()
                (out / f.name).write_bytes(body)

        ours_down, down_file = paired_medians(ours_download, loop_download_file, self.repeats)
        self.record(f"{label} download", total, ours_down, down_file, "sequential boto3 download_file loop")
        ours_down, down_get = paired_medians(ours_download, loop_get, self.repeats)
        self.record(f"{label} download", total, ours_down, down_get, "sequential get_object loop")
        storage.delete_prefix(f"s3://{self.bucket}/small")
        for path in (src, out):
            for f in path.iterdir():
                f.unlink()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuPerGet:
    """Client CPU per GET of small objects read by many threads: the cost a GPU node pays per image."""

    def __init__(self, bench: Bench, count: int, size: int, threads: int = 16) -> None:
        self.bench, self.threads = bench, threads
        self.keys = [f"cpu/{i:05d}.bin" for i in range(count)]
        self.size = size
        # The baseline: boto3 get_object with a connection pool that fits the threads (the default 10 would
        # reconnect and charge boto3 for it).
        self.client = boto3.client("s3", endpoint_url=bench.endpoint,
                                   config=Config(retries={"mode": "standard"}, max_pool_connections=threads * 2))

    def upload(self) -> None:
        data = os.urandom(self.size)
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda k: self.client.put_object(Bucket=self.bench.bucket, Key=k, Body=data), self.keys))

    def per_get_ms(self, get: Callable[[str], bytes]) -> float:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(get, self.keys[:64]))  # warm: connections, the fast client's store
            start = cpu_seconds()
            sizes = list(pool.map(lambda k: len(get(k)), self.keys))
            used = cpu_seconds() - start
        assert sizes == [self.size] * len(self.keys)
        return 1000 * used / len(self.keys)

    def ours(self, key: str) -> bytes:
        return storage.read_bytes(f"s3://{self.bench.bucket}/{key}")

    def boto3_get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bench.bucket, Key=key)["Body"].read()
        return body

    def on_boto3(self, get: Callable[[str], bytes]) -> float:
        """``per_get_ms`` with the storage layer forced onto boto3 (TRAINER_S3_CLIENT=boto3)."""
        os.environ["TRAINER_S3_CLIENT"] = "boto3"
        try:
            return self.per_get_ms(get)
        finally:
            os.environ.pop("TRAINER_S3_CLIENT", None)

    def run(self) -> None:
        self.upload()
        before = s3_fast.requests
        timings: dict[str, list[float]] = {"ours": [], "boto3": [], "ours-boto3": []}
        for i in range(self.bench.repeats):
            order: list[tuple[str, Callable[[], float]]] = [
                ("ours", lambda: self.per_get_ms(self.ours)), ("boto3", lambda: self.per_get_ms(self.boto3_get)),
                ("ours-boto3", lambda: self.on_boto3(self.ours))]
            for name, measure in order if i % 2 == 0 else reversed(order):
                timings[name].append(measure())
        ms = {name: statistics.median(values) for name, values in timings.items()}
        client = "obstore" if s3_fast.requests > before else "boto3"
        label = f"client CPU ms per GET ({self.size // 1000} KB, {self.threads} threads)"
        row = {"case": label, "baseline": "boto3 get_object", "client": client, "storage_cpu_ms": ms["ours"],
               "baseline_cpu_ms": ms["boto3"], "storage_on_boto3_cpu_ms": ms["ours-boto3"],
               "ratio": ms["ours"] / ms["boto3"]}
        self.bench.rows.append(row)
        print(f"  {label:<44} {ms['ours']:9.3f} {ms['boto3']:9.3f} {row['ratio']:7.2f}x   ours ({client}) / "
              f"boto3 get_object, lower is better; storage on boto3: {ms['ours-boto3']:.3f} ms", flush=True)


class ForkedFirstRead:
    """Client CPU of the first read in a process forked from one that already reads S3 (a DataLoader or converter
    worker): ours (a new session and client on the parent's parsed service models) against a new boto3 session's
    client, which is what the storage layer built before and what boto3's guide asks of each process."""

    def __init__(self, bench: Bench, repeats: int = 7) -> None:
        self.bench, self.repeats = bench, repeats
        self.key = "fork/first.bin"

    def in_child(self, read: Callable[[], bytes]) -> float:
        """CPU ms of ``read()`` in a forked child (sent back through a pipe)."""
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, leave without running the parent's exit handlers
            start = cpu_seconds()
            read()
            os.write(writer, f"{1000 * (cpu_seconds() - start):.3f}".encode())
            os._exit(0)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            text = pipe.read()
        os.waitpid(pid, 0)
        return float(text)

    def boto3_read(self) -> bytes:
        client = boto3.session.Session().client("s3", endpoint_url=self.bench.endpoint)
        body: bytes = client.get_object(Bucket=self.bench.bucket, Key=self.key)["Body"].read()
        return body

    def run(self) -> None:
        storage.write_bytes(f"s3://{self.bench.bucket}/{self.key}", os.urandom(100_000))
        uri = f"s3://{self.bench.bucket}/{self.key}"
        storage.read_bytes(uri)  # the parent has read: its client exists, as in a training process or the converter
        boto3.client("s3", endpoint_url=self.bench.endpoint).head_object(Bucket=self.bench.bucket, Key=self.key)
        ours, base = [], []
        for _ in range(self.repeats):
            ours.append(self.in_child(lambda: storage.read_bytes(uri)))
            base.append(self.in_child(self.boto3_read))
        ms_ours, ms_base = statistics.median(ours), statistics.median(base)
        label = "first read in a forked worker, client CPU ms"
        self.bench.rows.append({"case": label, "baseline": "new boto3 session, client and get_object",
                                "storage_cpu_ms": ms_ours, "baseline_cpu_ms": ms_base, "ratio": ms_ours / ms_base})
        print(f"  {label:<44} {ms_ours:9.1f} {ms_base:9.1f} {ms_ours / ms_base:7.2f}x   ours / a new boto3 session's "
              f"first get_object, lower is better (median of {self.repeats})", flush=True)


def start_proxy(upstream: str, latency_ms: float, seconds: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fault_proxy", "--upstream", upstream,
         "--latency-ms", str(latency_ms), "--max-seconds", str(seconds)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description="storage layer vs plain boto3 throughput")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one repeat (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency added by the proxy case (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--only", choices=("large", "small", "latency", "cpu", "fork"), help="run one case only")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    large_size = (32 if args.quick else 256) * 1024 * 1024
    count, size = (200, 100_000) if args.quick else (2000, 100_000)

    with LocalS3Server("127.0.0.1") as server, tempfile.TemporaryDirectory() as tmp:
        server.apply_env()
        bench = Bench(server.endpoint_url, Path(tmp), repeats)
        bench.plain.create_bucket(Bucket=bench.bucket)
        print(f"storage bench: moto S3 on {server.endpoint_url}, median of {repeats}, "
              f"{os.cpu_count()} CPUs, {storage.DEFAULT_WORKERS} parallel transfers")
        print(f"  {'case':<44} {'ours MB/s':>9} {'base MB/s':>9} {'ratio':>8}")
        if args.only in (None, "large"):
            bench.large(large_size)
        if args.only in (None, "small"):
            bench.small(count, size)
        if args.only in (None, "cpu"):
            CpuPerGet(bench, 400 if args.quick else 2000, 100_000).run()
        if args.only in (None, "fork"):
            ForkedFirstRead(bench).run()
        if args.latency_ms > 0 and args.only in (None, "latency"):
            proc, url = start_proxy(f"{server.host}:{server.port}", args.latency_ms, seconds=1800)
            try:
                bench.use_endpoint(url)
                lat_count = count // 4
                bench.small(lat_count, size, tag=f", +{args.latency_ms:g} ms/request")
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
