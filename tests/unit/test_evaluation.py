"""Our evaluation equals a direct pycocotools run on the same predictions, however they are split over ranks."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import BCCD
from trainer.annotations.convert import ConvertOptions, convert
from trainer.distributed import DistEnv
from trainer.evaluation import STAT_NAMES, DistributedEvaluator, EvalResult, evaluate_detections, load_ground_truth


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
    """A detector that answers each image with the boxes it is given, in the order inference.evaluate feeds images
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
    from trainer.inference import build_validation, evaluate

    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    config = load_config(None, [f"data.train.coco={path}", f"data.train.images={BCCD / 'JPEGImages'}",
                                f"data.val.coco={path}", f"data.val.images={BCCD / 'JPEGImages'}",
                                "data.workers=0", "data.batch_size=4"])
    result = evaluate(Oracle(perfect_outputs(doc)), build_validation(config.data.val, config, DistEnv()), DistEnv())
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


# ------------------------------------------------------------------ eval.backend: faster-coco-eval
TOLERANCE = 1e-4  # the promise in docs/training.md: faster-coco-eval's numbers are pycocotools'


def generated_detections(doc: dict, seed: int, false_positives: int = 4, decimals: int = 5) -> list[dict]:
    """A plausible detector's COCO results: GT boxes jittered in proportion to their size, 15% missed, 10% given
    the wrong class, up to ``false_positives`` random boxes per image, 10% of images without any detection,
    scores rounded as ``to_coco_detections`` rounds them (so some tie)."""
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in doc["categories"]]
    by_image: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    detections = []
    for image in doc["images"]:
        if rng.random() < 0.1:
            continue
        boxes = []
        for ann in by_image.get(image["id"], []):
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            dx, dy, dw, dh = rng.normal(0, 0.08, 4) * [w, h, w, h]
            category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(category_ids))
            boxes.append((category, [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)]))
        for _ in range(int(rng.integers(0, false_positives + 1))):
            w, h = rng.uniform(4, 250, 2)
            boxes.append((int(rng.choice(category_ids)), [rng.uniform(0, image["width"] - w),
                                                          rng.uniform(0, image["height"] - h), w, h]))
        detections += [{"image_id": image["id"], "category_id": category, "bbox": [round(float(v), 3) for v in box],
                        "score": round(float(rng.random()), decimals)} for category, box in boxes]
    return detections


def both_backends(doc: dict, detections: list[dict], image_ids: list[int] | None = None) -> list[EvalResult]:
    """The same detections scored by each backend, each on its own copy of the ground truth."""
    results = []
    for backend in ("pycocotools", "faster-coco-eval"):
        gt = load_ground_truth(copy.deepcopy(doc), backend)
        assert gt.backend == backend
        results.append(evaluate_detections(gt, detections, image_ids))
    return results


def assert_same(reference: EvalResult, fast: EvalResult) -> None:
    assert list(reference.stats) == list(fast.stats) == list(STAT_NAMES)
    assert [fast.stats[n] for n in STAT_NAMES] == pytest.approx([reference.stats[n] for n in STAT_NAMES],
                                                                abs=TOLERANCE)
    assert list(fast.per_class) == list(reference.per_class)
    assert list(fast.per_class.values()) == pytest.approx(list(reference.per_class.values()), abs=TOLERANCE)
    assert fast.detections == reference.detections


@pytest.fixture(scope="module")
def bccd_doc(bccd_test: Path) -> dict:
    return json.loads(bccd_test.read_text())


@pytest.mark.parametrize("seed, decimals", [(0, 5), (1, 1)])  # 1 decimal: scores tie within and across images
def test_faster_coco_eval_equals_pycocotools_on_bccd(bccd_doc: dict, seed: int, decimals: int) -> None:
    detections = generated_detections(bccd_doc, seed, decimals=decimals)
    before = copy.deepcopy(detections)
    reference, fast = both_backends(bccd_doc, detections)
    assert detections == before  # loadRes adds keys to the records it is given: ours are copies
    assert_same(reference, fast)
    # realistic numbers, not an agreement on 0 or 1 (the pycocotools path is tied to a direct run above)
    assert 0.1 < reference.ap < 0.9 and all(0.05 < v < 0.95 for v in reference.per_class.values())
    assert all(0.05 < reference.stats[n] < 0.95 for n in STAT_NAMES)


def test_crowds_area_ranges_and_a_category_without_ground_truth(bccd_doc: dict) -> None:
    """Crowd boxes (matched by intersection over the detection, many times, never counted), boxes in every area
    range and exactly on its bounds (32², 96²), an ``area`` field that differs from the box (COCO ranks by the
    field), and a class with detections but no ground truth (-1, left out of the means)."""
    doc = copy.deepcopy(bccd_doc)
    doc["categories"].append({"id": 99, "name": "Ghost", "supercategory": "none"})
    for n, ann in enumerate(doc["annotations"]):
        x, y = ann["bbox"][:2]
        if n % 4 == 1:
            ann["bbox"], ann["area"] = [x, y, 20.0, 24.5], 490.0  # small
        elif n % 11 == 2:
            ann["bbox"], ann["area"] = [x, y, 32.0, 32.0], 1024.0  # on the small/medium bound
        elif n % 13 == 3:
            ann["bbox"], ann["area"] = [x, y, 96.0, 96.0], 9216.0  # on the medium/large bound
        elif n % 17 == 4:
            ann["area"] = ann["area"] * 0.5
        ann["iscrowd"] = int(n % 8 == 0)
    detections = generated_detections(doc, seed=3)
    for det in detections[::9]:
        det["bbox"][2:] = [32.0, 32.0]
    for det in detections[::13]:
        det["category_id"] = 99
    crowds = [a for a in doc["annotations"] if a["iscrowd"]]
    detections += [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5 + 0.1 * k,
                    "bbox": [a["bbox"][0] + k, a["bbox"][1] + k, a["bbox"][2] / 2, a["bbox"][3] / 2]}
                   for a in crowds for k in range(3)]  # inside a crowd: ignored, not false positives
    reference, fast = both_backends(doc, detections)
    assert_same(reference, fast)
    assert reference.per_class["Ghost"] == fast.per_class["Ghost"] == -1.0
    assert all(reference.stats[n] > 0.05 for n in ("APs", "APm", "APl", "ARs", "ARm", "ARl"))
    # the crowds change the numbers (so this case exercises them): without the flag those detections are misses
    for ann in doc["annotations"]:
        ann["iscrowd"] = 0
    assert evaluate_detections(load_ground_truth(doc), detections).ap < reference.ap - 0.01


def test_more_than_100_detections_in_an_image(bccd_doc: dict) -> None:
    """COCO keeps the 100 best-scored detections per image and class (AR1/AR10: the 1 and 10 best): the backends
    must cut at the same place."""
    detections = generated_detections(bccd_doc, seed=4)
    rng = np.random.default_rng(4)
    flood = [{"image_id": image["id"], "category_id": 2, "score": round(float(rng.uniform(0.4, 1)), 5),
              "bbox": [round(float(v), 3) for v in (*rng.uniform(0, 400, 2), *rng.uniform(10, 60, 2))]}
             for image in bccd_doc["images"][:20] for _ in range(130)]  # 130 RBC boxes each, mostly above the true
    scored = [image["id"] for image in bccd_doc["images"][:30]]  # the flooded images and a few others: quicker
    reference, fast = both_backends(bccd_doc, detections + flood, scored)
    assert_same(reference, fast)
    assert 0 < reference.stats["AR1"] < reference.stats["AR10"] < reference.stats["AR100"]
    # the cut bites: without it, false positives could not lower recall
    unflooded = evaluate_detections(load_ground_truth(copy.deepcopy(bccd_doc)), detections, scored)
    assert reference.stats["AR100"] < unflooded.stats["AR100"] - 0.01


def test_image_ids_restrict_the_evaluation(bccd_doc: dict) -> None:
    """``image_ids``: what the ranks predicted; detections and ground truth on other images do not count."""
    detections = generated_detections(bccd_doc, seed=5)
    subset = [image["id"] for image in bccd_doc["images"]][::3]
    reference, fast = both_backends(bccd_doc, detections, subset)
    assert_same(reference, fast)
    assert reference.stats != evaluate_detections(load_ground_truth(copy.deepcopy(bccd_doc)), detections).stats


def test_no_such_objects_is_minus_one_and_no_detections_is_zero(bccd_doc: dict) -> None:
    doc = copy.deepcopy(bccd_doc)
    doc["annotations"] = [a for a in doc["annotations"] if a["area"] > 32 ** 2]  # no small objects left
    reference, fast = both_backends(doc, generated_detections(doc, seed=6))
    assert_same(reference, fast)
    assert reference.stats["APs"] == reference.stats["ARs"] == -1.0 and reference.stats["APm"] > 0
    reference, fast = both_backends(doc, [])
    assert reference == fast == EvalResult({n: 0.0 for n in STAT_NAMES}, {"Platelets": 0.0, "RBC": 0.0, "WBC": 0.0})


def test_the_distributed_evaluator_uses_the_ground_truths_backend(bccd_test: Path) -> None:
    gt_doc = json.loads(bccd_test.read_text())
    outputs, targets = noisy_outputs(gt_doc, seed=7)
    evaluator = DistributedEvaluator(sorted(c["id"] for c in gt_doc["categories"]))
    evaluator.update(outputs, targets)
    reference = evaluator.finish(DistEnv(), load_ground_truth(bccd_test.read_bytes()))
    fast = evaluator.finish(DistEnv(), load_ground_truth(bccd_test.read_bytes(), "faster-coco-eval"))
    assert reference is not None and fast is not None
    assert_same(reference, fast)
    with pytest.raises(ValueError, match="needs the ground truth"):
        evaluator.finish(DistEnv(), None)
    with pytest.raises(ValueError, match="unknown evaluation backend 'fast'"):
        load_ground_truth(bccd_test.read_bytes(), "fast")


def test_the_fast_backend_is_quiet(bccd_doc: dict, capfd: pytest.CaptureFixture[str],
                                   caplog: pytest.LogCaptureFixture) -> None:
    """Its progress lines and summary table (print or logging) stay out of the trainer's log."""
    with caplog.at_level(logging.DEBUG):
        gt = load_ground_truth(copy.deepcopy(bccd_doc), "faster-coco-eval")
        assert evaluate_detections(gt, generated_detections(bccd_doc, seed=8)).ap > 0
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("faster_coco_eval")] == []
