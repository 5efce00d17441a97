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
        boxes.append([5, 5, 60, 60])  # a false positive
        labels.append(1)
        scores.append(0.2)
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "scores": torch.tensor(scores)})
        targets.append({"image_id": image["id"]})
    return outputs, targets


def direct_pycocotools(gt_path: Path, detections: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
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


# ------------------------------------------------------------------ broken ground truth (issue 14)
class Oracle(torch.nn.Module):
    """A detector that answers each image with the boxes it is given, in the order evaluate_split feeds images
    (one process, no shuffling, no loader workers): perfect detections, whatever the ground truth file says."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = list(outputs)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.outputs.pop(0) for _ in images]


def perfect_outputs(doc: dict) -> list[dict[str, torch.Tensor]]:
    """Score-1 detections equal to every valid box of ``doc`` (positive size), per image in file order."""
    label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    outputs = []
    for image in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == image["id"] and a["bbox"][2] > 0
                and a["bbox"][3] > 0 and not a.get("iscrowd")]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                        "scores": torch.ones(len(anns))})
    return outputs


def evaluate_with_oracle(doc: dict, tmp_path: Path) -> dict[str, float]:
    from trainer.config import load_config
    from trainer.inference import evaluate_split

    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    config = load_config(None, [f"data.train.coco={path}", f"data.train.images={BCCD / 'JPEGImages'}",
                                f"data.val.coco={path}", f"data.val.images={BCCD / 'JPEGImages'}",
                                "data.workers=0", "data.batch_size=4"])
    result = evaluate_split(Oracle(perfect_outputs(doc)), config.data.val, config, DistEnv())
    assert result is not None
    return {"AP": result.stats["AP"], **{f"AP {k}": v for k, v in result.per_class.items()}}


def test_perfect_detections_score_1_with_duplicate_annotation_ids(bccd_test: Path, tmp_path: Path) -> None:
    """pycocotools indexes annotations by id: with repeated ids it lost boxes (AP 0.0019 before the repair)."""
    doc = json.loads(bccd_test.read_text())
    for n, ann in enumerate(doc["annotations"]):
        ann["id"] = n % 50 + 1
    assert evaluate_with_oracle(doc, tmp_path) == {"AP": 1.0, "AP Platelets": 1.0, "AP RBC": 1.0, "AP WBC": 1.0}


def test_perfect_detections_score_1_with_a_negative_width_box(bccd_test: Path, tmp_path: Path) -> None:
    """A box of negative width can match nothing: kept, it capped recall (AP 0.97 before it was dropped)."""
    doc = json.loads(bccd_test.read_text())
    for ann in doc["annotations"][::7]:
        ann["bbox"][2] = -ann["bbox"][2]
    assert evaluate_with_oracle(doc, tmp_path)["AP"] == 1.0


def test_annotations_without_ids_are_numbered_not_a_crash_after_an_epoch(bccd_test: Path, tmp_path: Path) -> None:
    doc = json.loads(bccd_test.read_text())
    for ann in doc["annotations"]:
        del ann["id"]
    assert evaluate_with_oracle(doc, tmp_path)["AP"] == 1.0


def test_repairs_are_one_warning_per_kind(bccd_test: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from trainer.data.coco_index import load_coco_index

    doc = json.loads(bccd_test.read_text())
    anns = doc["annotations"]
    anns[1]["id"] = anns[0]["id"]
    anns[2]["id"] = anns[0]["id"]
    anns[3]["bbox"] = [10, 10, 0, 5]
    anns[4]["bbox"] = [10, 10, float("nan"), 5]
    anns[5]["bbox"] = [630, 10, 50, 5]  # 640 wide: clipped to 10
    anns[6]["bbox"] = [700, 10, 50, 5]  # entirely outside
    del anns[7]["id"]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        index = load_coco_index(str(path), keep_document=True)
    assert index.repairs == {"duplicate_id": 2, "degenerate_bbox": 1, "invalid_bbox": 1, "clipped_bbox": 1,
                             "outside_image": 1, "missing_id": 1}
    assert len(caplog.records) == 6 and all(str(path) in r.getMessage() for r in caplog.records)
    assert index.document is not None
    ids = [a["id"] for a in index.document["annotations"]]
    assert len(ids) == len(set(ids)) == len(anns) - 3
    clipped = next(a for a in index.document["annotations"] if a["id"] == anns[5]["id"])
    assert clipped["bbox"] == [630.0, 10.0, 10.0, 5.0]
