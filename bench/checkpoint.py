"""Checkpoint costs for fasterrcnn_resnet50_fpn + SGD with momentum, against baselines measured in the same run.

1. **Training stall per checkpoint**: the time the loop is blocked by ``take_snapshot`` + ``CheckpointWriter.submit``
   (the upload goes on in the background) versus a synchronous ``torch.save`` + upload of the same state.
   Target: ratio <= 0.10.
2. **Upload throughput**: ``CheckpointWriter.commit`` (serialise, sha256, parallel upload of the payload,
   manifest, latest.json) versus boto3 ``upload_file`` of the same bytes from a file. Target: >= 0.9.
3. **Time to the first training step**: ``python -m trainer.train`` resuming from that checkpoint versus a fresh
   start of the same config (model built, data indexed, first step logged), with the run in S3 and on local disk.
   Target: <= 1.2. The S3 row carries the test server's own cost: moto copies a whole object for every GET,
   ranged or not (its ``FakeKey.value``), so the parallel ranged download of a 165 MB payload costs it about 3x a
   single stream; S3, MinIO and Ceph serve ranges in proportion to their size.

Everything runs against a local S3 server (moto) on 127.0.0.1. Run: ``.venv/bin/python bench/checkpoint.py``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import torch  # noqa: E402

from trainer import storage  # noqa: E402
from trainer.checkpoint import CheckpointWriter, Snapshot, cpu_copy  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.local_s3 import LocalS3Server  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.synth import make_shapes_dataset  # noqa: E402

MODEL = "fasterrcnn_resnet50_fpn"
STOP_SAVE = re.compile(r"checkpoint committed ([\d.]+) s after the signal")
STOP_SECONDS: list[float] = []  # SIGTERM → stop checkpoint committed, per round
FIRST_STEP = re.compile(r"epoch \d+/\d+ step \d+/\d+ loss")  # the first progress line, fresh or resumed


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(ModelConfig(name=MODEL, min_size=128, max_size=128), 4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 10, 60, 60]]),
                                                "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    optimizer.step()  # momentum buffers now exist: the optimizer state is as large as the model
    return model, optimizer


def stall_and_throughput(bucket: str, repeats: int) -> None:
    model, optimizer = model_and_optimizer()
    writer = CheckpointWriter(f"s3://{bucket}/bench-run", keep_last=2)
    ours_stall, base_stall, ours_upload, base_upload, ours_commit = [], [], [], [], []
    size = 0
    client = boto3.client("s3")
    for step in range(1, repeats + 1):
        # ours: the loop is blocked for the CPU copy and the hand-off only
        started = time.perf_counter()
        snapshot = Snapshot(step, 0, {"model": {"model": cpu_copy(model.state_dict())},
                                      "optimizer": {"optimizer": cpu_copy(optimizer.state_dict())}}, {"step": step})
        writer.submit(snapshot)
        ours_stall.append(time.perf_counter() - started)
        result = writer.wait()
        assert result is not None
        ours_upload.append(result.upload_seconds)
        ours_commit.append(result.seconds)
        size = result.bytes
        # baseline: what a loop without an async writer does: serialise and upload before the next step
        started = time.perf_counter()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        storage.write_bytes(f"s3://{bucket}/sync/ckpt.pt", buffer.getvalue())
        base_stall.append(time.perf_counter() - started)
        with tempfile.NamedTemporaryFile() as handle:  # boto3 upload_file of the same bytes, from a file
            handle.write(buffer.getvalue())
            handle.flush()
            started = time.perf_counter()
            client.upload_file(handle.name, bucket, "boto3/ckpt.pt")
            base_upload.append(time.perf_counter() - started)
    writer.close()
    stall, base = statistics.median(ours_stall), statistics.median(base_stall)
    ours_rate = size / statistics.median(ours_upload) / 1e6
    base_rate = size / statistics.median(base_upload) / 1e6
    print(f"checkpoint of {MODEL} + SGD momentum: {size / 1e6:.0f} MB, median of {repeats}")
    print("| measure | ours | baseline | ratio (target) |\n|---|---|---|---|")
    print(f"| training stall per checkpoint | {stall:.3f} s | {base:.3f} s (torch.save + upload) | "
          f"{stall / base:.3f} (<= 0.10) |")
    print(f"| upload throughput | {ours_rate:.0f} MB/s (upload + sha256 after serialising) | {base_rate:.0f} MB/s "
          f"(boto3 upload_file) | {ours_rate / base_rate:.2f} (>= 0.9) |")
    print(f"| whole background commit (serialise + upload) | {statistics.median(ours_commit):.2f} s | - | - |")


def first_step_seconds(overrides: list[str]) -> float:
    """Seconds from process start to the first progress line of ``python -m trainer.train``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *[x for o in overrides for x in ("--set", o)]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None
    elapsed = None
    for line in proc.stdout:
        if match := STOP_SAVE.search(line):
            STOP_SECONDS.append(float(match.group(1)))
        if FIRST_STEP.search(line) and elapsed is None:
            elapsed = time.perf_counter() - started
            proc.terminate()  # SIGTERM: it saves a stop checkpoint, which the next round resumes from
    proc.wait(600)
    if elapsed is None:
        raise SystemExit("the trainer never logged its first step")
    return elapsed


def resume_time(run_dir: str, workdir: Path, repeats: int, where: str) -> None:
    data = make_shapes_dataset(str(workdir / "shapes"), n=20, size=128, seed=0)
    common = [f"data.train.coco={data.train_uri}", f"data.train.images={data.images_uri}", "data.workers=0",
              f"model.name={MODEL}", "model.min_size=128", "model.max_size=128", "data.batch_size=1",
              "log.every_steps=1", "checkpoint.every_steps=0", "schedule.epochs=100", f"run.dir={run_dir}"]
    fresh, resumed = [], []
    STOP_SECONDS.clear()
    for round_index in range(repeats):
        fresh.append(first_step_seconds([*common, f"run.name=fresh{round_index}", "checkpoint.resume=never"]))
        resumed.append(first_step_seconds([*common, "run.name=resume"]))  # round 0 creates the checkpoint
    fresh_s, resumed_s = statistics.median(fresh), statistics.median(resumed[1:])
    print(f"| time to first step, run on {where} | {resumed_s:.2f} s resuming | {fresh_s:.2f} s fresh start | "
          f"{resumed_s / fresh_s:.2f} (<= 1.2) |")
    print(f"| SIGTERM to committed stop checkpoint, {where} | {statistics.median(STOP_SECONDS):.1f} s (median of "
          f"{len(STOP_SECONDS)}) | grace period 30 s | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("all", "stall", "resume"), default="all",
                        help="run only the stall/throughput rows or only the resume rows")
    args = parser.parse_args()
    with LocalS3Server("127.0.0.1") as server, tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        server.apply_env()
        bucket = "bench-checkpoint"
        boto3.client("s3").create_bucket(Bucket=bucket)
        if args.part in ("all", "stall"):
            stall_and_throughput(bucket, args.repeats)
        if args.part in ("all", "resume"):
            print("| measure | ours | baseline | ratio (target) |\n|---|---|---|---|")
            resume_time(f"s3://{bucket}/runs", Path(tmp) / "s3", args.repeats + 1, "S3 (moto)")
            resume_time(str(Path(tmp) / "runs"), Path(tmp) / "local", args.repeats + 1, "local disk")


if __name__ == "__main__":
    main()
