"""`make demo` runs to the end, prints where its outputs are, and stops the server it started."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BCCD, REPO

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    # one epoch, on images scaled to half the demo's size and with fewer region proposals: every step of the demo,
    # with less arithmetic in each
    quicker = ["model.min_size=160", "model.max_size=214", "model.options.rpn_pre_nms_top_n_train=300",
               "model.options.rpn_post_nms_top_n_train=100", "model.options.box_batch_size_per_image=32",
               "model.options.rpn_pre_nms_top_n_test=300", "model.options.rpn_post_nms_top_n_test=100"]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--epochs", "1",
                             *[arg for setting in quicker for arg in ("--set", setting)]],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified: 735 files identical" in result.stdout
    assert "OK: 0 errors, 2 warnings" in result.stdout  # the convert summary (BCCD's two degenerate boxes)
    for split in ("train", "val", "test", "trainval"):
        assert (out / "coco" / f"{split}.json").stat().st_size > 10_000
    assert f"Outputs: {out}/bccd" in result.stdout
    assert (out / "bccd" / "JPEGImages" / "BloodImage_00001.jpg").read_bytes() == \
        (BCCD / "JPEGImages" / "BloodImage_00001.jpg").read_bytes()

    # the training part: 2 processes trained from S3, evaluated, predicted, and everything came back from S3
    assert "[rank 1]" in result.stderr + result.stdout
    assert re.search(r"demo mAP on BCCD val after 1 epochs: AP \d\.\d{3}, AP50 \d\.\d{3}", result.stdout)
    run = out / "run"
    for name in ("config.yaml", "metrics.jsonl", "model_best.pt", "model_final.pt", "eval.json",
                 "plots/loss.png", "plots/map.png", "predictions/detections.json", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*.png"))) == 10  # BloodImage_00000..00009

    port = int(re.search(r"endpoint: http://127\.0\.0\.1:(\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the demo left its S3 server running"
