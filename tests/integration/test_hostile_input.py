"""`python -m trainer.train` on broken and hostile input (issue 14): one clear line and the right exit code, before
any work where the input allows it; a diverging run stops, says why, and writes no non-finite weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, S3Env
from trainer.exit_codes import EXIT_CONFIG_ERROR, EXIT_FAILURE
from trainer.synth import make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), n=8, size=64, seed=2)
    return root


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=timeout)


def base(shapes: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [f"data.train.coco={shapes / 'train.json'}", f"data.train.images={shapes / 'images'}",
                 f"run.dir={run_dir}", "run.name=r", "data.batch_size=2", "data.workers=0",
                 "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=64", "model.max_size=64",
                 "schedule.epochs=1", "checkpoint.resume=never", "log.every_steps=1", "eval.every_epochs=0",
                 *extra]
    return [arg for override in overrides for arg in ("--set", override)]


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: Path, s3: S3Env) -> None:
    for missing in (str(tmp_path / "missing.yaml"), s3.uri("configs/missing.yaml")):
        result = train("--config", missing)
        assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-2000:]
        assert last_line(result) .startswith(f"trainer: error: {missing}: no such config file")


def test_run_name_cannot_leave_the_run_dir(tmp_path: Path, shapes: Path) -> None:
    result = train(*base(shapes, tmp_path / "runs", "run.name=.."))
    assert result.returncode == EXIT_CONFIG_ERROR and "run.name: must be one folder name" in last_line(result)
    assert not (tmp_path / "config.yaml").exists()


def test_a_broken_val_file_is_refused_before_the_first_step(tmp_path: Path, shapes: Path) -> None:
    doc = json.loads((shapes / "val.json").read_text())
    doc["images"].append(dict(doc["images"][0]))  # the same image id twice: which one do its boxes belong to?
    (tmp_path / "val.json").write_text(json.dumps(doc))
    result = train(*base(shapes, tmp_path / "runs", f"data.val.coco={tmp_path / 'val.json'}",
                         f"data.val.images={shapes / 'images'}", "eval.every_epochs=1"))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    assert "duplicate image id" in last_line(result) and str(tmp_path / "val.json") in last_line(result)
    assert "loss" not in result.stderr  # no training step ran
    assert not (tmp_path / "runs" / "r" / "metrics.jsonl").exists()


def test_images_under_a_missing_bucket_name_the_bucket(tmp_path: Path, shapes: Path, s3: S3Env) -> None:
    result = train(*base(shapes, tmp_path / "runs", "data.train.images=s3://no-such-bucket-x/images"))
    assert result.returncode == EXIT_FAILURE
    assert "does not exist" in last_line(result) and "no-such-bucket-x" in last_line(result)


def test_a_diverging_run_logs_each_skip_stops_with_exit_2_and_writes_no_weights(tmp_path: Path,
                                                                                shapes: Path) -> None:
    """A normalisation by 1e-38 overflows the first convolution: every loss is NaN/inf."""
    result = train(*base(shapes, tmp_path / "runs", "data.mean=[0.0, 0.0, 0.0]",
                         "data.std=[1.0e-38, 1.0e-38, 1.0e-38]", "train.max_nonfinite_steps=3"))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "not finite:" in line and "step skipped" in line]
    assert len(skipped) == 3 and "rank 0 step 1: not finite: loss_" in skipped[0]
    assert "were not finite for 3 steps in a row" in last_line(result)
    run = tmp_path / "runs" / "r"
    assert not (run / "model_final.pt").exists() and not (run / "model_best.pt").exists()
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=lambda token: pytest.fail(f"metrics.jsonl holds {token}"))
