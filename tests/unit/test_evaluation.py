"""Our evaluation equals a direct pycocotools run on the same predictions, however they are split over ranks."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import BCCD
from trainer.annotations.convert import ConvertOptions, convert
from trainer.distributed import DistEnv
from trainer.evaluation import STAT_NAMES, DistributedEvaluator, evaluate_detections, load_ground_truth


@pytest.fixture(scope="module")
def bccd_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    convert(ConvertOptions(str(BCCD), str(out), splits=["test"], workers=1), on_progress=lambda _: None)
    return out / "test.json"


def noisy_outputs(gt: dict, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Model-style outputs (XYXY, labels 1..K) made by jittering and dropping ground truth, plus false positives."""
    rng = np.random.default_rng(seed)
    label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    outputs, targets = [], []
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        boxes, labels, scores = [], [], []
        for a in anns:
            if rng.random() < 0.2:
                continue
            x, y, w, h = (v + rng.normal(0, 3) for v in a["bbox"])
            boxes.append([x, y, x + max(w, 1), y + max(h, 1)])
            labels.append(label_of[a["category_id"]])
            scores.append(float(rng.uniform(0.3, 1)))
        boxes.append([5, 5, 60, 60]); labels.append(1); scores.append(0.2)  # a false positive
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "scores": torch.tensor(scores)})
        targets.append({"image_id": image["id"]})
    return outputs, targets


def direct_pycocotools(gt_path: Path, detections: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
    return list(evaluator.stats)


def test_equal_to_direct_pycocotools_and_independent_of_rank_split(bccd_test: Path) -> None:
    gt_doc = json.loads(bccd_test.read_text())
    gt = load_ground_truth(bccd_test.read_bytes())
    category_ids = sorted(c["id"] for c in gt_doc["categories"])
    outputs, targets = noisy_outputs(gt_doc)

    single = DistributedEvaluator(category_ids)
    single.update(outputs, targets)
    result = single.finish(DistEnv(), gt)
    assert result is not None
    detections = [d for dets in single.by_image.values() for d in dets]
    expected = direct_pycocotools(bccd_test, detections)
    assert [result.stats[name] for name in STAT_NAMES] == pytest.approx(expected, abs=1e-12)
    assert 0.3 < result.ap < 0.95 and set(result.per_class) == {"Platelets", "RBC", "WBC"}

    # Two "ranks" with the sampler's padding (image 0 seen by both) gathered on rank 0 give the same numbers.
    halves = [DistributedEvaluator(category_ids), DistributedEvaluator(category_ids)]
    halves[0].update(outputs[:40], targets[:40])
    halves[1].update(outputs[39:] + outputs[:1], targets[39:] + targets[:1])
    merged = DistributedEvaluator(category_ids)
    for half in halves:
        for image_id, dets in half.by_image.items():
            merged.by_image.setdefault(image_id, dets)
    assert merged.finish(DistEnv(), gt).stats == result.stats  # type: ignore[union-attr]


def test_perfect_and_empty_predictions(bccd_test: Path) -> None:
    gt = load_ground_truth(bccd_test.read_bytes())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    result = evaluate_detections(gt, perfect)
    assert result.stats["AP"] == pytest.approx(1.0) and all(v == pytest.approx(1.0) for v in result.per_class.values())
    assert evaluate_detections(gt, []).stats["AP"] == 0.0
