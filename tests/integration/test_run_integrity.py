"""Run integrity at the edges: one owner per run, a stop honoured at start-up, at the first step and during an
evaluation, and a schedule that does not bend when a run resumes on another world size.

Real processes throughout (``python -m trainer.train`` and torchrun with gloo), the moto S3 server on loopback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import S3Env
from tests.integration.test_resume import Run, overrides
from tests.support.fault_proxy import FaultPlan, FaultProxy
from tests.support.torchrun import REPO, assert_same_lr_curve, lr_by_samples, start_torchrun
from trainer import cli, storage
from trainer.exit_codes import EXIT_CONFIG_ERROR, EXIT_PREEMPTED
from trainer.progress import parse_progress
from trainer.synth import make_shapes_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """20 training images and a larger validation set (40), so an evaluation lasts long enough to interrupt."""
    root = tmp_path_factory.mktemp("integrity")
    train = make_shapes_dataset(str(root / "train"), n=25, size=96, seed=5)
    val = make_shapes_dataset(str(root / "val"), n=50, size=96, seed=6, val_fraction=0.8)
    return {"train": train.train_uri, "images": train.images_uri, "val": val.val_uri, "val_images": val.images_uri}


def settings(shapes: dict[str, str], run_dir: str, *extra: str) -> list[str]:
    return overrides(shapes, Path(run_dir), f"run.dir={run_dir}", f"data.val.images={shapes['val_images']}",
                     "data.workers=0", *extra)


def start_single(args: list[str], env: dict[str, str] | None = None) -> Run:
    """``python -m trainer.train`` (one process, no torchrun), output merged into one pipe."""
    full_env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", **(env or {})}
    return Run(subprocess.Popen([sys.executable, "-m", "trainer.train", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO, env=full_env))


def s3_env(s3: S3Env) -> dict[str, str]:
    return dict(s3.server.client_env())


def test_a_second_job_on_a_held_run_exits_2_at_once_and_the_first_finishes_intact(
        shapes: dict[str, str], s3: S3Env, capsys: pytest.CaptureFixture[str]) -> None:
    runs = s3.uri("runs")
    args = settings(shapes, runs, "schedule.epochs=2", "eval.every_epochs=0")
    first = start_single(args, s3_env(s3))
    first.wait_for(lambda line: "checkpoint committed" in line)
    started = time.monotonic()
    second = start_single(args, s3_env(s3))
    assert second.finish(120) == EXIT_CONFIG_ERROR
    assert time.monotonic() - started < 60  # at once: before any data or model is built
    refusal = [line for line in second.lines if "being written by another job" in line]
    assert len(refusal) == 1 and f"{runs}/r" in refusal[0] and "lease renewed" in refusal[0], second.output
    assert "Traceback" not in second.output
    assert first.finish() == 0, first.output[-4000:]

    assert cli.main(["ckpt", "ls", f"{runs}/r", "--verify", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(row["verified"] for row in rows)
    lease = json.loads(storage.read_bytes(f"{runs}/r/lease.json"))
    assert lease["released"] is True  # a clean end frees the run at once
    third = start_single(args, s3_env(s3))  # the first job's run resumes normally afterwards
    assert third.finish() == 0, third.output[-3000:]
    assert "resumed from" in third.output and "nothing left to train" in third.output


def test_sigterm_during_start_up_exits_preempted_without_writing(shapes: dict[str, str], tmp_path: Path) -> None:
    run = start_single(settings(shapes, str(tmp_path)))
    run.wait_for(lambda line: "resolved configuration" in line)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(60) == EXIT_PREEMPTED, run.output[-3000:]
    assert "during start-up" in run.output and "Traceback" not in run.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_sigterm_at_the_first_step_commits_that_step(shapes: dict[str, str], tmp_path: Path) -> None:
    run = start_single(settings(shapes, str(tmp_path), "checkpoint.every_steps=0"))
    run.wait_for(lambda line: "run outputs under" in line)  # the loop starts right after this line
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(120) == EXIT_PREEMPTED, run.output[-3000:]
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] >= 1


def test_sigterm_during_a_checkpoint_upload_commits_the_stop_checkpoint_after_it(
        shapes: dict[str, str], s3: S3Env, fault_proxy: FaultProxy) -> None:
    runs = s3.uri("runs")
    fault_proxy.plan = FaultPlan(latency_s=0.3, methods=("PUT", "POST"))  # each upload takes a few seconds
    env = {**s3_env(s3), "AWS_ENDPOINT_URL": fault_proxy.url}
    run = start_single(settings(shapes, runs, "checkpoint.every_steps=3", "eval.every_epochs=0"), env)
    run.wait_for(lambda line: "uploading in the background" in line and "checkpoint step 3" in line)
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(120) == EXIT_PREEMPTED, run.output[-3000:]
    assert time.monotonic() - signalled < 30
    committed = [line for line in run.lines if "checkpoint committed" in line]
    assert any("step-000000003" in line for line in committed), run.output[-3000:]  # the upload in flight
    fault_proxy.plan = FaultPlan()
    latest = json.loads(storage.read_bytes(f"{runs}/r/checkpoints/latest.json"))
    assert latest["step"] >= 4 and any(f"step-{latest['step']:09d}" in line for line in committed)


def test_sigterm_during_evaluation_commits_in_time_and_the_evaluation_runs_again_after_resume(
        shapes: dict[str, str], tmp_path: Path) -> None:
    args = settings(shapes, str(tmp_path), "schedule.epochs=1", "checkpoint.every_steps=0")
    run = start_single(args)
    run.wait_for(lambda line: "evaluating epoch 1 " in line)
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(120) == EXIT_PREEMPTED, run.output[-3000:]
    assert time.monotonic() - signalled < 20  # well inside the default 30 s grace period
    assert "stop requested during the evaluation of epoch 1" in run.output
    assert not any(line for line in run.lines if "epoch 1 AP" in line or "eval epoch 1" in line)
    state_dir = tmp_path / "r" / "checkpoints" / json.loads(
        (tmp_path / "r" / "checkpoints" / "latest.json").read_text())["dir"]
    state = json.loads((state_dir / "state.json").read_text())
    assert state["eval_pending"] is True and state["epoch_done"] is True and state["epoch"] == 0

    again = start_single(args)
    assert again.finish() == 0, again.output[-3000:]
    assert "the evaluation of epoch 1, which runs again" in again.output
    evaluations = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line).get("kind") == "eval"]
    assert [record["epoch"] for record in evaluations] == [1]  # the interrupted one is not lost, nor doubled


def _global_step(line: str) -> int:
    """The step of a progress line from any rank tag (a world of one has none)."""
    progress = parse_progress(line)
    return 0 if progress is None else (progress.epoch - 1) * progress.steps + progress.step


def test_a_resume_on_more_processes_continues_the_same_lr_curve_and_milestone(
        shapes: dict[str, str], tmp_path: Path) -> None:
    """1 -> 2 processes mid-epoch with a multistep schedule: the LR at every step both runs logged equals the
    uninterrupted run's (1e-9), the milestone fires in the same epoch, the final LR is equal, and the progress
    line's step x/y stays in range. (2 -> 1 with cosine: tests/integration/test_resume.py.)"""
    schedule = ["schedule.epochs=2", "schedule.kind=multistep", "schedule.milestones=[1]", "schedule.warmup_iters=3",
                "checkpoint.every_steps=0", "eval.every_epochs=0", "data.val.coco="]
    # The uninterrupted run starts on the same world size (warm-up iterations become samples at the start).
    reference = Run(start_torchrun(*settings(shapes, str(tmp_path / "ref"), *schedule), nproc=1))
    assert reference.finish() == 0, reference.output[-3000:]
    expected = lr_by_samples(tmp_path / "ref")

    run_dir = tmp_path / "resumed"
    first = Run(start_torchrun(*settings(shapes, str(run_dir), *schedule), nproc=1))
    first.wait_for(lambda line: _global_step(line) >= 6)  # epoch 1, 6 of 10 steps: before the milestone
    first.proc.send_signal(signal.SIGTERM)
    first.finish()  # plain torchrun exits 1 on a signal; trainer-launch turns it into 75
    assert f"exiting with code {EXIT_PREEMPTED}" in first.output, first.output[-3000:]
    stopped_at = json.loads((run_dir / "r" / "checkpoints" / "latest.json").read_text())["step"]
    then = Run(start_torchrun(*settings(shapes, str(run_dir), *schedule), nproc=2))
    assert then.finish() == 0, then.output[-3000:]
    assert "world size 1 -> 2" in then.output

    resumed = lr_by_samples(run_dir)
    assert max(resumed) == 40  # 2 epochs of 20 images
    assert_same_lr_curve(resumed, expected, after_samples=stopped_at * 2)

    def first_decayed(records: dict[int, tuple[int, float]]) -> int:
        top = max(lr for _, lr in records.values())
        return min(epoch for epoch, lr in records.values() if lr < top * 0.5)

    assert first_decayed(resumed) == first_decayed(expected)
    progress = [parse_progress(line) for line in then.lines]
    shown = [(p.step, p.steps) for p in progress if p is not None]
    assert shown and all(0 < step <= steps == 5 for step, steps in shown), shown


def _eval_records(run_dir: Path) -> list[tuple[int, int]]:
    records = [json.loads(line) for line in (run_dir / "r" / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["evals_without_improvement"]) for r in records if r.get("kind") == "eval"]


def test_early_stopping_ends_the_run_at_the_same_evaluation_after_a_kill_9_and_resume(
        shapes: dict[str, str], tmp_path: Path) -> None:
    """eval.patience=1 with a min_delta no metric can beat: evaluation 2 brings no improvement, so the run ends
    after epoch 2 of 5 with exit 0, a final checkpoint and model_final.pt. Killed with -9 after its first evaluation
    and started again, the run continues the count from its checkpoint and stops at that same evaluation (bitwise
    exactness of a resume is tests/integration/test_resume.py's); started once more, it has nothing left to train."""
    args = settings(shapes, str(tmp_path), "schedule.epochs=5", "eval.patience=1", "eval.min_delta=1.0",
                    "data.batch_size=4", "checkpoint.every_steps=3",
                    f"data.val.coco={shapes['train']}", f"data.val.images={shapes['images']}")
    killed = start_single(args)
    killed.wait_for(lambda line: "eval epoch 1:" in line)
    killed.proc.kill()
    killed.finish()
    assert "early stopping" not in killed.output
    resumed = start_single(args)
    assert resumed.finish() == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output
    assert "early stopping: AP has not risen by more than eval.min_delta=1 in 1 evaluation(s)" in resumed.output
    assert _eval_records(tmp_path) == [(1, 0), (2, 1)]
    assert (tmp_path / "r" / "model_final.pt").exists()
    assert not [line for line in resumed.output.splitlines() if "epoch 3/5" in line]

    again = start_single(args)
    assert again.finish() == 0, again.output[-3000:]
    assert "stopped early" in again.output and "nothing left to train" in again.output
    assert _eval_records(tmp_path) == [(1, 0), (2, 1)]
