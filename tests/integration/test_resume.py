"""Exact resume under real torchrun process groups (gloo): kill -9 of one rank, SIGTERM (preemption), a restart
with another world size, and a kill while a checkpoint upload is in flight.

The runs are tiny (96 px shapes, a few steps per epoch) but real: every process, signal and file is the real one.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import S3Env
from tests.support.fault_proxy import FaultPlan, FaultProxy
from tests.support.torchrun import assert_same_lr_curve, lr_by_samples, start_torchrun, worker_pids
from tests.support.torchrun import global_step_of as step_of
from trainer import storage
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.exit_codes import EXIT_PREEMPTED
from trainer.synth import make_shapes_dataset

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 300


class Run:
    """A torchrun process whose merged output is collected by a thread, so the test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = RUN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new_line:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("line never came; output:\n" + "\n".join(self.lines[-60:]))
                self._new_line.wait(0.5)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.2)  # let the reader thread take the last lines
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes_dataset(str(root), n=25, size=96, seed=5)  # 20 train images: 5 steps of 2 x 2
    return {"train": data.train_uri, "val": data.val_uri, "images": data.images_uri}


def overrides(shapes: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    settings = [
        f"data.train.coco={shapes['train']}", f"data.train.images={shapes['images']}",
        f"data.val.coco={shapes['val']}", f"data.val.images={shapes['images']}",
        f"run.dir={run_dir}", "run.name=r", "data.batch_size=2", "data.workers=1", "data.aspect_ratio_groups=0",
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=96",
        "model.options.box_batch_size_per_image=32", "model.options.rpn_post_nms_top_n_train=100",
        "schedule.epochs=3", "schedule.warmup_iters=2", "optim.lr=0.01", "log.every_steps=1",
        "train.deterministic=true", "checkpoint.every_steps=2", "checkpoint.keep_last=2", *extra,
    ]
    return [arg for setting in settings for arg in ("--set", setting)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "r" / "model_final.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference_dir(shapes: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    run = Run(start_torchrun(*overrides(shapes, run_dir)))
    assert run.finish() == 0, run.output[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted run."""
    return final_weights(reference_dir)


def test_kill_9_of_one_rank_then_restart_gives_bitwise_equal_weights(shapes: dict[str, str], tmp_path: Path,
                                                                      reference: dict[str, torch.Tensor]) -> None:
    # One kill point (a seeded pick among steps 3..13): the SIGTERM, upload-kill and one-process restart tests below
    # resume from three other points, and tests/e2e/test_cluster_sim.py kills a whole pod.
    kill_steps = random.Random(1234).sample(range(3, 14), 1)
    for attempt, kill_step in enumerate(kill_steps):
        run_dir = tmp_path / f"kill{attempt}"
        run = Run(start_torchrun(*overrides(shapes, run_dir), max_restarts=1))
        run.wait_for(lambda line, k=kill_step: (step_of(line) or 0) >= k)
        victim = random.Random(attempt).choice(worker_pids(run.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert run.finish() == 0, run.output[-4000:]
        assert "resumed from" in run.output, f"kill at step {kill_step} did not resume:\n{run.output[-3000:]}"
        weights = final_weights(run_dir)
        assert weights.keys() == reference.keys()
        different = [k for k in reference if not torch.equal(reference[k], weights[k])]
        assert not different, f"kill at step {kill_step}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_sigterm_commits_a_checkpoint_and_exits_preempted_then_resumes(
        shapes: dict[str, str], tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    run = Run(start_torchrun(*overrides(shapes, tmp_path, "checkpoint.every_steps=0", "checkpoint.every_epoch=false")))
    run.wait_for(lambda line: (step_of(line) or 0) >= 7)
    run.proc.send_signal(signal.SIGTERM)  # as the kubelet does to the container's main process
    run.finish()
    assert "SIGTERM received" in run.output
    assert f"exiting with code {EXIT_PREEMPTED} (preempted)" in run.output
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert 7 <= latest["step"] < 15  # the stop checkpoint, not one from a schedule (both turned off)

    again = Run(start_torchrun(*overrides(shapes, tmp_path, "checkpoint.every_steps=0",
                                          "checkpoint.every_epoch=false")))
    assert again.finish() == 0, again.output[-4000:]
    assert f"resumed from {tmp_path / 'r' / 'checkpoints' / 'step-'}{latest['step']:09d}" in again.output
    weights = final_weights(tmp_path)
    assert all(torch.equal(reference[k], weights[k]) for k in reference)


def test_restart_with_one_process_sees_every_sample_of_the_epoch_once_on_the_same_lr_curve(
        shapes: dict[str, str], tmp_path: Path, reference_dir: Path) -> None:
    """Data order continues exactly, and the LR schedule (over samples, not steps) continues the uninterrupted
    2-process run's cosine curve at every common sample count."""
    first, second = tmp_path / "trace-2-processes", tmp_path / "trace-1-process"
    run = Run(start_torchrun(*overrides(shapes, tmp_path, f"log.sample_trace={first}", "checkpoint.every_steps=0")))
    run.wait_for(lambda line: (step_of(line) or 0) >= 7)  # epoch 2, 2 steps into it
    run.proc.send_signal(signal.SIGTERM)
    run.finish()
    stop_step = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["step"]
    assert stop_step % 5 != 0, "the stop must fall inside an epoch for this test"

    single = Run(start_torchrun(*overrides(shapes, tmp_path, f"log.sample_trace={second}",
                                           "checkpoint.every_steps=0"), nproc=1))
    assert single.finish() == 0, single.output[-4000:]
    assert "world size 2 -> 1: data order continues exactly" in single.output

    interrupted_epoch = stop_step // 5
    counted: Counter[int] = Counter()
    for folder, trained in ((first, lambda step: step < stop_step), (second, lambda step: True)):
        for path in folder.iterdir():
            for line in path.read_text().splitlines():
                _, epoch, step, image_id = map(int, line.split())
                if epoch == interrupted_epoch and trained(step):  # batches logged before the step they feed
                    counted[image_id] += 1
    train_ids = {image["id"] for image in json.loads(Path(shapes["train"]).read_text())["images"]}
    assert set(counted) == train_ids and set(counted.values()) == {1}, counted
    assert_same_lr_curve(lr_by_samples(tmp_path), lr_by_samples(reference_dir), after_samples=stop_step * 4)


def test_kill_during_an_upload_keeps_the_previous_checkpoint_as_latest(
        shapes: dict[str, str], fault_proxy: FaultProxy, s3: S3Env,
        reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    runs = s3.uri("runs")
    fault_proxy.plan = FaultPlan(latency_s=0.15, methods=("PUT", "POST"))  # uploads take a few seconds
    run = Run(start_torchrun(*overrides(shapes, Path(runs)), "--set", f"run.dir={runs}"))
    run.wait_for(lambda line: "checkpoint committed" in line and "step-000000002" in line)
    in_flight = run.wait_for(lambda line: "uploading in the background" in line and "checkpoint step 4" in line)
    for pid in worker_pids(run.proc.pid):  # the whole pod dies: every rank, no time to finish anything
        os.kill(pid, signal.SIGKILL)
    run.finish()
    assert "step-000000004" not in "".join(line for line in run.lines if "committed" in line), in_flight
    latest = json.loads(storage.read_text(f"{runs}/r/checkpoints/latest.json"))
    assert latest["step"] == 2

    fault_proxy.plan = FaultPlan()
    again = Run(start_torchrun(*overrides(shapes, Path(runs)), "--set", f"run.dir={runs}"))
    assert again.finish() == 0, again.output[-4000:]
    assert "resumed from " + f"{runs}/r/checkpoints/step-000000002" in again.output
    final = torch.load(io.BytesIO(storage.read_bytes(f"{runs}/r/model_final.pt")), weights_only=True)["model"]
    assert all(torch.equal(reference[k], final[k]) for k in reference)


def test_runs_through_503s_and_connection_resets_complete_with_valid_checkpoints(
        shapes: dict[str, str], fault_proxy: FaultProxy, s3: S3Env) -> None:
    """5% of requests answered 503 throughout; response bodies cut mid-stream while the second run resumes
    (its large reads are the checkpoint's)."""
    runs = s3.uri("runs")
    settings = [*overrides(shapes, Path(runs)), "--set", f"run.dir={runs}"]
    fault_proxy.plan = FaultPlan(error_rate=0.05, error_statuses=(503,), seed=7)
    first = Run(start_torchrun(*settings, "--set", "schedule.epochs=2"))
    assert first.finish() == 0, first.output[-4000:]
    fault_proxy.plan = FaultPlan(error_rate=0.05, error_statuses=(503,), cut_rate=0.25, cut_after_bytes=65536,
                                 seed=8)
    second = Run(start_torchrun(*settings))
    assert second.finish() == 0, second.output[-4000:]
    assert "resumed from" in second.output
    assert fault_proxy.stats.errors > 0 and fault_proxy.stats.cuts > 0, fault_proxy.stats  # the faults happened
    fault_proxy.plan = FaultPlan()
    checkpoints = [c for c in list_checkpoints(f"{runs}/r/checkpoints") if c.committed]
    assert checkpoints and checkpoints[-1].step == 15
    for checkpoint in checkpoints:
        load_checkpoint(checkpoint.uri)  # verifies every size and sha256
    assert "CHECKPOINT NOT SAVED" not in first.output + second.output
