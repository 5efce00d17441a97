"""`trainer.train` end to end under a real 2-process torchrun (gloo): it trains, evaluates and writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.support.torchrun import torchrun
from trainer import cli
from trainer.plots import PLOT_SIZE_PX
from trainer.progress import parse_progress
from trainer.synth import make_shapes_dataset
from trainer.weights import WEIGHTS_FORMAT


def test_two_processes_train_evaluate_and_write_outputs(tmp_path: Path) -> None:
    data = make_shapes_dataset(str(tmp_path / "shapes"), n=24, size=96, seed=1)
    overrides = [
        f"data.train.coco={data.train_uri}", f"data.train.images={data.images_uri}",
        f"data.val.coco={data.val_uri}", f"data.val.images={data.images_uri}",
        f"run.dir={tmp_path / 'runs'}", "run.name=smoke", "data.batch_size=2", "data.workers=1",
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=96",
        "schedule.epochs=2", "schedule.warmup_iters=2", "log.every_steps=2", "optim.lr=0.01",
    ]
    args = [arg for override in overrides for arg in ("--set", override)]
    result = torchrun("trainer.train", *args, module=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    progress = [p for p in map(parse_progress, output.splitlines()) if p is not None]
    assert progress and progress[-1].epoch == 2 and progress[-1].epochs == 2
    assert "[rank 0]" in output and "[rank 1]" in output  # both ranks log, tagged
    assert output.count("prepared once for every evaluation") == 1 and output.count("evaluating epoch") == 2

    run = tmp_path / "runs" / "smoke"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and set(evals[-1]["per_class_ap"]) == {"circle", "square", "triangle"}
    logged_rates = [p.images_per_s for p in progress]
    recorded_rates = [r["images_per_s"] for r in records if r["kind"] == "train"]
    assert recorded_rates == pytest.approx(logged_rates, abs=0.051)  # the training rate, not a loader counter
    assert (run / "config.yaml").read_text().startswith("run:")
    weights = torch.load(run / "model_final.pt", weights_only=True)
    assert weights["format"] == WEIGHTS_FORMAT and weights["category_names"] == ["circle", "square", "triangle"]
    assert any(k.startswith("roi_heads.box_predictor") for k in weights["model"])
    assert (run / "model_best.pt").stat().st_size > 1_000_000
    for name in ("loss.png", "lr.png", "map.png", "per_class_ap.png"):
        with Image.open(run / "plots" / name) as picture:
            assert picture.format == "PNG" and picture.size == PLOT_SIZE_PX, name

    # `trainer eval` of the final weights reproduces the last in-training evaluation (same model, same split)
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--config", str(run / "config.yaml"), "--weights", str(run / "model_final.pt"),
                     "--out", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["AP"] == pytest.approx(evals[-1]["AP"], abs=1e-3)
    assert evaluated["per_class_ap"] == pytest.approx(evals[-1]["per_class_ap"], abs=1e-3)

    # `trainer predict` on a glob of images: one detections JSON and one PNG per image, of the image's size
    out = tmp_path / "predictions"
    assert cli.main(["predict", "--weights", str(run / "model_final.pt"),
                     "--images", f"{data.images_uri}/shape_0000*.jpg", "--out", str(out), "--score-thr", "0"]) == 0
    detections = json.loads((out / "detections.json").read_text())
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 10  # shape_00000 .. shape_00009
    for picture_path in pictures:
        with Image.open(picture_path) as picture:
            assert picture.format == "PNG" and picture.size == (96, 96)
    assert all(d["category_name"] in {"circle", "square", "triangle"} and len(d["bbox"]) == 4 for d in detections)
