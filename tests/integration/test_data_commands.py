"""`trainer stats` (exact streaming mean/std) and `trainer show` (sample grids) as users run them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from tests.conftest import REPO, S3Env
from tests.support.images import simple_dataset
from trainer import storage
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.stats import channel_stats


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=300)


def test_stats_equal_the_one_big_tensor_recipe_for_any_worker_count(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path, count=9)
    dataset = CocoDetection(load_coco_index(str(coco)), str(images), drop_empty=False)
    everything = torch.cat([dataset[i][0].flatten(1) for i in range(len(dataset))], dim=1).double() / 255
    expected_mean, expected_std = everything.mean(dim=1), everything.std(dim=1, unbiased=False)
    for workers in (0, 2):
        stats = channel_stats(dataset, workers=workers)
        assert stats.pixels == everything.shape[1]
        assert torch.allclose(torch.tensor(stats.mean, dtype=torch.float64), expected_mean, atol=1e-12)
        assert torch.allclose(torch.tensor(stats.std, dtype=torch.float64), expected_std, atol=1e-12)


def test_stats_command_prints_config_yaml(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path, count=4)
    result = run("stats", "--coco", str(coco), "--images", str(images), "--workers", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "data:" and lines[1].startswith("  mean: [") and lines[2].startswith("  std: [")


def test_show_writes_png_grids_to_s3(tmp_path: Path, s3: S3Env) -> None:
    coco, images = simple_dataset(tmp_path, count=20)
    result = run("show", "--coco", str(coco), "--images", str(images), "--out", s3.uri("viz"),
                 "--augment", "hflip", "--n", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [s3.uri("viz/samples_epoch0_000.png"), s3.uri("viz/samples_epoch0_001.png")]
    grid = Image.open(io.BytesIO(storage.read_bytes(s3.uri("viz/samples_epoch0_000.png"))))
    assert grid.format == "PNG" and grid.width >= 4 * 320


def test_bad_coco_json_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    result = run("stats", "--coco", str(tmp_path / "bad.json"), "--images", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("not valid JSON (Expecting property name enclosed in double quotes, "
                                          "line 1, column 2)")
