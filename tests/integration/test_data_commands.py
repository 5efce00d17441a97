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
from tests.support.images import bomb_png, simple_dataset
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


# ------------------------------------------------------------------ hostile and broken input (issue 14)
def test_stats_do_not_count_the_substitute_of_a_missing_image(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path, count=6)
    dataset = CocoDetection(load_coco_index(str(coco)), str(images), drop_empty=False)
    present = [dataset[i][0].flatten(1) for i in range(len(dataset)) if i != 2]
    (images / "img_002.png").unlink()
    everything = torch.cat(present, dim=1).double() / 255
    for workers in (0, 2):
        stats = channel_stats(dataset, workers=workers)
        assert stats.images == 5 and stats.pixels == everything.shape[1]
        assert stats.skipped == (str(images / "img_002.png"),)
        assert torch.allclose(torch.tensor(stats.mean, dtype=torch.float64), everything.mean(dim=1), atol=1e-12)


def run_limited(args: list[str], address_space_gb: int = 8) -> tuple[subprocess.CompletedProcess[str], int]:
    """`trainer ARGS` in a child with a hard address-space limit; returns its result and peak RSS in MB.

    The child's own peak is VmHWM (this process image only): its ru_maxrss would also count the forked copy of
    the test process that ran before exec (Linux keeps that high-water mark), about 1.5 GB under pytest-xdist.
    Its DataLoader workers are forks of the child itself, so RUSAGE_CHILDREN measures them fairly."""
    code = ("import re, resource, sys; from trainer.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('maxrss', hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")
    limit = address_space_gb << 30

    def cap() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ), timeout=300, preexec_fn=cap)
    line = [x for x in result.stderr.splitlines() if x.startswith("maxrss")]
    peak = max(int(v) for v in line[-1].split()[1:]) // 1024 if line else -1
    return result, peak


def test_stats_over_a_decompression_bomb_skip_it_in_bounded_memory(tmp_path: Path) -> None:
    """875 KB of PNG declaring 30000 x 30000 pixels: before the header check, stats grew to 19.6 GB."""
    coco, images = simple_dataset(tmp_path, count=5)
    (images / "img_003.png").write_bytes(bomb_png(30000, 30000))
    assert (images / "img_003.png").stat().st_size < 1_000_000
    result, peak_mb = run_limited(["stats", "--coco", str(coco), "--images", str(images), "--workers", "1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "img_003.png" in result.stderr and "declares 900000000 pixels, over the limit of 89478485" in result.stderr
    assert "4 images" in result.stderr and "1 unreadable images skipped" in result.stderr
    assert 0 < peak_mb < 1500, peak_mb


def test_show_needs_a_positive_count_and_synth_a_bounded_size(tmp_path: Path) -> None:
    coco, images = simple_dataset(tmp_path, count=2)
    result = run("show", "--coco", str(coco), "--images", str(images), "--out", str(tmp_path / "viz"), "--n", "-5")
    assert result.returncode == 2 and "--n must be at least 1" in result.stderr
    result = run("synth", "--out", str(tmp_path / "s"), "--n", "2", "--size", "100000")
    assert result.returncode == 2 and "--size in [32, 4096]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_stats_under_a_missing_bucket_say_so_in_one_line(tmp_path: Path, s3: S3Env) -> None:
    coco, _ = simple_dataset(tmp_path, count=2)
    result = run("stats", "--coco", str(coco), "--images", "s3://no-such-bucket-here/images", "--workers", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("trainer: error: s3://no-such-bucket-here/images/")
    assert "does not exist" in result.stderr
