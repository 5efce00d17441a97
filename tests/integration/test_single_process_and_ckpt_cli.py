"""`python -m trainer.train` without torchrun (a world of one), then `trainer ckpt ls/export` on its checkpoints
and `trainer predict` with the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.torchrun import REPO
from tests.unit.test_checkpoint import DAMAGE
from trainer import cli
from trainer.checkpoint import step_dir_name
from trainer.synth import make_shapes_dataset


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("single")
    data = make_shapes_dataset(str(root / "shapes"), n=10, size=96, seed=2)  # 8 train images: 4 steps an epoch
    settings = [
        f"data.train.coco={data.train_uri}", f"data.train.images={data.images_uri}",
        f"data.val.coco={data.val_uri}", f"data.val.images={data.images_uri}", f"run.dir={root / 'runs'}",
        "run.name=one", "data.batch_size=2", "data.workers=0", "model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
        "model.min_size=96", "model.max_size=96", "schedule.epochs=2", "schedule.warmup_iters=1", "train.ema=true",
        "checkpoint.every_steps=3", "checkpoint.keep_last=10", "log.every_steps=1",
    ]
    result = subprocess.run([sys.executable, "-m", "trainer.train", *[x for s in settings for x in ("--set", s)]],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env={"OMP_NUM_THREADS": "1",
                                                                                        "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "joined process group" not in result.stderr  # no torchrun: no group, one process
    return root / "runs" / "one"


def test_ckpt_ls_lists_steps_latest_and_best(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ckpt", "ls", str(finished_run), "--verify", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 6, 8]  # every 3 steps, and at the end of each epoch
    assert all(r["verified"] for r in rows)
    assert "latest" in rows[-1]["flags"]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2]
    best = [r for r in rows if "best" in r["flags"]]
    assert len(best) == 1 and best[0]["metric"] == max(r["metric"] for r in rows if r["metric"] is not None)


def test_ckpt_ls_reports_a_corrupt_checkpoint(finished_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    state = copy / "checkpoints" / step_dir_name(6) / "state.json"
    state.write_text(state.read_text().replace('"step"', '"stop"'))
    assert cli.main(["ckpt", "ls", str(copy), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "CORRUPT" in captured.out and "size or sha256 differs" in captured.err


def test_export_ema_and_model_weights_then_predict(finished_run: Path, tmp_path: Path) -> None:
    assert cli.main(["ckpt", "export", str(finished_run), "--out", str(tmp_path / "ema.pt"), "--ema"]) == 0
    assert cli.main(["ckpt", "export", str(finished_run / "checkpoints" / step_dir_name(3)),
                     "--out", str(tmp_path / "step3.pt")]) == 0
    ema = torch.load(tmp_path / "ema.pt", weights_only=True)
    final = torch.load(finished_run / "model_final.pt", weights_only=True)  # EMA on: the final file holds EMA weights
    assert all(torch.equal(ema["model"][k], final["model"][k]) for k in final["model"])
    step3 = torch.load(tmp_path / "step3.pt", weights_only=True)
    assert not all(torch.equal(step3["model"][k], final["model"][k]) for k in final["model"])
    assert ema["category_names"] == ["circle", "square", "triangle"]
    images = finished_run.parent.parent / "shapes" / "images"
    assert cli.main(["predict", "--weights", str(tmp_path / "ema.pt"), "--images", str(images),
                     "--out", str(tmp_path / "pred"), "--no-pictures"]) == 0
    assert isinstance(json.loads((tmp_path / "pred" / "detections.json").read_text()), list)


def test_a_data_error_ends_the_run_with_exit_2_instead_of_hanging(tmp_path: Path) -> None:
    """Every image missing (a wrong data.train.images): loader workers raise, the run stops with the config-error
    code, and its exit does not wait on the loader workers."""
    data = make_shapes_dataset(str(tmp_path / "shapes"), n=6, size=96, seed=2)
    settings = [f"data.train.coco={data.train_uri}", f"data.train.images={tmp_path / 'nowhere'}",
                f"run.dir={tmp_path / 'runs'}", "data.workers=2", "data.batch_size=2",
                "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=96"]
    result = subprocess.run([sys.executable, "-m", "trainer.train", *[x for s in settings for x in ("--set", s)]],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "are all unreadable" in result.stderr


def test_forcing_a_resume_across_a_model_change_fails_with_one_clear_line(finished_run: Path) -> None:
    command = [sys.executable, "-m", "trainer.train", "--config", str(finished_run / "config.yaml"),
               "--set", "schedule.epochs=3", "--set", "model.options.box_batch_size_per_image=16",
               "--set", "model.anchor_sizes=[[16, 32], [16, 32], [16, 32]]"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    recorded = (finished_run / "config.yaml").read_text()
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    assert (finished_run / "config.yaml").read_text() == recorded  # the run's record is left alone
    forced = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert forced.returncode == 2, forced.stderr[-3000:]
    assert "cannot restore this run from it" in forced.stderr and "Traceback" not in forced.stderr


@pytest.mark.parametrize("damage", ["manifest without size", "model.pt refused by torch.load"])
def test_a_damaged_latest_checkpoint_is_corrupt_everywhere_and_the_previous_good_one_is_used(
        finished_run: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "runs" / "one"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(finished_run), str(copy)], check=True)
    DAMAGE[damage](copy / "checkpoints" / step_dir_name(8))  # the latest one
    capsys.readouterr()

    assert cli.main(["ckpt", "ls", str(copy), "--verify", "--json"]) == 1
    rows = {row["step"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[8]["verified"] is False and all(rows[s]["verified"] for s in (3, 4, 6))

    assert cli.main(["ckpt", "export", str(copy), "--out", str(tmp_path / "w.pt")]) == 0
    assert cli.main(["ckpt", "export", str(copy / "checkpoints" / step_dir_name(6)),
                     "--out", str(tmp_path / "six.pt")]) == 0
    exported, six = (torch.load(tmp_path / name, weights_only=True)["model"] for name in ("w.pt", "six.pt"))
    assert all(torch.equal(exported[k], six[k]) for k in six)  # the previous good checkpoint's weights
    images = finished_run.parent.parent / "shapes" / "images"
    assert cli.main(["predict", "--weights", str(copy), "--images", str(images), "--out", str(tmp_path / "pred"),
                     "--no-pictures"]) == 0  # a run folder as --weights: its newest good checkpoint
    assert "CORRUPT" in capsys.readouterr().err

    if damage == "manifest without size":  # and a resume falls back too (one training run is enough)
        resumed = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(finished_run / "config.yaml"),
                                  "--set", f"run.dir={copy.parent}", "--set", "schedule.epochs=3"],
                                 capture_output=True, text=True, timeout=300, cwd=REPO,
                                 env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {copy / 'checkpoints' / step_dir_name(6)}" in resumed.stderr
        assert "Traceback" not in resumed.stderr
