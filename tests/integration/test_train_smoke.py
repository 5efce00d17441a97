"""`trainer.train` end to end under a real 2-process torchrun (gloo): it trains, evaluates and writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support.torchrun import torchrun
from trainer.progress import parse_progress
from trainer.synth import make_shapes_dataset


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

    run = tmp_path / "runs" / "smoke"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and set(evals[-1]["per_class_ap"]) == {"circle", "square", "triangle"}
    assert (run / "config.yaml").read_text().startswith("run:")
    weights = torch.load(run / "model_final.pt", weights_only=True)
    assert any(k.startswith("roi_heads.box_predictor") for k in weights)
